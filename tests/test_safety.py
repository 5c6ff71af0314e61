"""Safe loading, secrets and leftovers: the parts of bad input that are not one job's exit status.

- Every numeric config key refuses values out of its range (a schema sweep, not a list to keep).
- Models load without running code: ``trust_remote_code`` only from the job's own config, weights
  from safetensors unless ``model.allow_pickle``, ``model.revision`` only for the hub id it pins;
  export ``--merge`` never obeys the checkpoint's own files; a newer bioray's checkpoint is refused.
- Secrets in the environment are masked in what the jobs print (bioray.redact).
- Temporary folders of killed runs are removed by the next run, live ones never (bioray.tempdirs).
- Caches cut short are rebuilt, not read half; the sample folder never replaces a folder of the user's.
- Ray's token authentication is forced on for the local Ray bioray starts, with a private token file.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from bioray.config import Config, ModelSection, from_dict, to_dict
from bioray.errors import BiorayError, CheckpointError, ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- config


def _numeric_keys(cls=Config, prefix=""):
    """Every int or float key of the schema (optional ones too), by dotted name, with its type."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_keys(tp, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if len(args) == 1 and args[0] in (int, float):
            yield f"{prefix}{f.name}", args[0]


NUMERIC_KEYS = sorted(_numeric_keys())


def _with(key: str, value) -> dict:
    data = to_dict(Config())
    node = data
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    return data


@pytest.mark.parametrize("key,tp", NUMERIC_KEYS, ids=[k for k, _ in NUMERIC_KEYS])
def test_every_numeric_key_refuses_values_out_of_range(key, tp):
    # -2 is out of range for every key (max_failures takes -1 = no limit); floats also refuse NaN.
    for bad in (-2, float("nan")) if tp is float else (-2,):
        with pytest.raises(ConfigError, match=rf"^config key '{key}'"):
            from_dict(_with(key, bad))
    from_dict(_with(key, getattr(_section(key), key.rsplit(".", 1)[1])))  # its default passes


def _section(key: str):
    node = Config()
    for part in key.split(".")[:-1]:
        node = getattr(node, part)
    return node


def test_the_sweep_finds_the_keys_users_set():
    keys = {k for k, _ in NUMERIC_KEYS}
    assert {"lora.rank", "lora.alpha", "train.lr", "train.max_steps", "train.micro_batch_size", "train.num_workers",
            "data.max_seq_len", "mixture.epoch_size", "train.keep_checkpoints", "run.seed"} <= keys


def test_eval_score_may_name_every_metric_scoring_reports_and_no_other():
    from bioray.config.validate import TASK_METRICS
    from bioray.evaluate.metrics import score_source

    reported = {
        "ner": score_source("ner", ["a b"], ["a : O\nb : B"], ["a : O\nb : B"]),
        "re": score_source("re", ["x"], ["true"], ["true"], label_space=["false", "true"]),
        "cls": score_source("cls", ["x"], ["a"], ["a"], label_space=["a", "none"]),
        "nli": score_source("nli", ["x"], ["entailment"], ["entailment"]),
        "qa": score_source("qa", ["x"], ["yes"], ["yes"]),
    }
    assert {task: set(m) for task, m in reported.items()} == {t: set(m) for t, m in TASK_METRICS.items()}
    sources = [{"name": "ncbi", "format": "iob", "task": "ner", "entity": "disease", "files": {}}]
    assert from_dict({"corpus": {"sources": sources}, "eval": {"score": "ncbi/recall"}}).eval.score == "ncbi/recall"
    with pytest.raises(ConfigError, match="eval.score"):
        from_dict({"corpus": {"sources": sources}, "eval": {"score": "ncbi/accuracy"}})


# ---------------------------------------------------------------------------------------- loading models


def _calls(name: str):
    """Every call of ``X.name(...)`` in the package: (file, line, callee text, keyword names and values)."""
    for path in sorted((ROOT / "bioray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                yield f"{path.relative_to(ROOT)}:{node.lineno}", ast.unparse(node.func.value), kw


def test_every_from_pretrained_takes_trust_remote_code_from_the_jobs_config():
    seen = 0
    for where, callee, kw in _calls("from_pretrained"):
        if callee.startswith("Peft"):
            continue  # an adapter: peft runs no code of the folder's, and weights are safetensors (checked)
        seen += 1
        assert kw.get("trust_remote_code") == "cfg.model.trust_remote_code", where
        assert "revision" in kw, where
        if callee == "AutoModelForCausalLM":
            assert kw.get("use_safetensors") == "None if cfg.model.allow_pickle else True", where
    assert seen >= 2


def _model_folder(folder: Path, weights: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    (folder / weights).write_bytes(b"\0" * 16)
    return folder


def test_a_pickle_only_folder_is_refused_unless_the_config_allows_it(tmp_path):
    from bioray.model import check_model_folder

    folder = _model_folder(tmp_path / "m", "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"pickle weights only \(pytorch_model.bin\).*model.allow_pickle: true"):
        check_model_folder(folder, Config(), "k")
    check_model_folder(folder, Config(model=ModelSection(allow_pickle=True)), "k")
    check_model_folder(_model_folder(tmp_path / "s", "model.safetensors"), Config(), "k")
    with pytest.raises(ConfigError, match="no model weights"):
        check_model_folder(_model_folder(tmp_path / "n", "weights.txt"), Config(), "k")


def test_loading_passes_the_configs_settings_and_the_revision_only_to_its_hub_id(monkeypatch):
    import transformers

    from bioray.model import load_base, load_tokenizer

    seen = []

    def record(path, **kw):
        seen.append((path, kw))
        raise RuntimeError("recorded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    cfg = from_dict({"model": {"name_or_path": "org/model", "revision": "abc123", "allow_pickle": True}})
    for load, path in ((load_base, "org/model"), (load_tokenizer, "org/model"), (load_tokenizer, "/tmp/checkpoint")):
        with pytest.raises(RuntimeError):
            load(path, cfg)
    (_, base), (_, tok), (_, ckpt) = seen
    assert base["trust_remote_code"] is False and base["use_safetensors"] is None and base["revision"] == "abc123"
    assert tok["revision"] == "abc123" and ckpt["revision"] is None
    seen.clear()
    with pytest.raises(RuntimeError):
        load_base("org/model", Config())
    assert seen[0][1]["use_safetensors"] is True and seen[0][1]["revision"] is None


def _checkpoint(folder: Path, base: Path, **trained) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (folder / "tokenizer_config.json").write_text("{}")
    model = {"name_or_path": str(base), **trained}
    (folder / "bioray.yaml").write_text(json.dumps({"model": model}))
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1}))
    return folder


def test_export_merge_loads_as_the_command_says_never_as_the_checkpoint_says(tmp_path, monkeypatch):
    import bioray.model
    from bioray.export import export_checkpoint

    base = _model_folder(tmp_path / "base", "model.safetensors")
    # Received from someone else: its bioray.yaml asks for remote code and pickle.
    ckpt = _checkpoint(tmp_path / "ckpt", base, trust_remote_code=True, allow_pickle=True)
    seen = []

    def record(path, cfg, dtype=None):
        seen.append(cfg.model)
        raise RuntimeError("recorded")

    monkeypatch.setattr(bioray.model, "load_base", record)
    with pytest.raises(RuntimeError):
        export_checkpoint(ckpt, tmp_path / "out", merge=True, expected_base=str(base))
    assert seen[0].trust_remote_code is False and seen[0].allow_pickle is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ckpt"]  # no export, no temporary folder
    with pytest.raises(ConfigError, match="--merge needs --base"):
        export_checkpoint(ckpt, tmp_path / "out", merge=True)


def test_a_checkpoint_of_a_newer_bioray_is_refused(tmp_path):
    from bioray.checkpoint import check_version

    # Relative to this bioray (0.2.0 when written): the same and older load, newer is refused.
    for made, refused in (("0.2.0", False), ("0.1.9", False), ("0.2.1", True), ("1.0.0rc1", True), ("x", False)):
        (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 1, "bioray_version": made}))
        if refused:
            with pytest.raises(CheckpointError, match=f"written by bioray {made}, newer than this bioray"):
                check_version(tmp_path)
        else:
            check_version(tmp_path)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 1}))  # before the field existed
    check_version(tmp_path)


def test_evaluate_and_export_check_the_base_revision(tmp_path):
    from bioray.checkpoint import check_revision

    ckpt = _checkpoint(tmp_path / "ckpt", tmp_path, revision="abc")
    check_revision(ckpt, "abc", "k")
    with pytest.raises(CheckpointError, match="trained on base revision 'abc', not None"):
        check_revision(ckpt, None, "k")


def test_safetensors_cut_short_is_found_without_reading_the_tensors(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from bioray.model import safetensors_complete

    path = tmp_path / "model.safetensors"
    save_file({"w": np.zeros((64, 64), dtype=np.float32)}, str(path))
    assert safetensors_complete(path)
    path.write_bytes(path.read_bytes()[:-100])
    assert not safetensors_complete(path)
    path.write_bytes(b"\x08")
    assert not safetensors_complete(path)


# ---------------------------------------------------------------------------------------- caches


def test_a_tokenised_cache_entry_cut_short_reads_as_a_miss(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bioray.data import cached_meta

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"]}), tmp_path / "data" / "part-0.parquet")
    (tmp_path / "meta.json").write_text(json.dumps({"records": 3, "sources": {}}))
    assert cached_meta(tmp_path)["records"] == 3
    (tmp_path / "meta.json").write_text('{"records": 3, "sou')  # a write cut short
    assert cached_meta(tmp_path) is None
    (tmp_path / "meta.json").write_text(json.dumps({"records": 4, "sources": {}}))  # a shard missing
    assert cached_meta(tmp_path) is None
    (tmp_path / "meta.json").write_text(json.dumps({"records": 3, "sources": {}}))
    shard = tmp_path / "data" / "part-0.parquet"
    shard.write_bytes(shard.read_bytes()[:-20])  # a shard cut short
    assert cached_meta(tmp_path) is None


def test_a_source_that_lost_every_record_to_max_seq_len_stops_the_run_unless_it_weighs_0():
    from bioray.data import check_overlong

    sources = [{"name": n, "format": "nli", "task": "nli", "files": {"train": "x"}} for n in ("a", "b")]
    meta = {"sources": {"a": {"records": 0, "dropped_overlong": 5}, "b": {"records": 9, "dropped_overlong": 0}}}
    with pytest.raises(DataError, match=r"source 'a': all 5 train records are longer than data.max_seq_len=512"):
        check_overlong(from_dict({"corpus": {"sources": sources}}), meta)
    check_overlong(from_dict({"corpus": {"sources": sources}, "mixture": {"weights": {"a": 0}}}), meta)


def test_the_sample_folder_never_replaces_a_folder_bioray_did_not_write(tmp_path):
    from bioray.corpus.sample import SAMPLE_VERSION, write_sample

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "ner_train.tsv").write_text("my own annotations\n")
    with pytest.raises(ConfigError, match="no VERSION file"):
        write_sample(mine)
    (mine / "VERSION").write_text("1")
    (mine / "patients.csv").write_text("...")
    with pytest.raises(ConfigError, match=r"holds files bioray did not write \(patients.csv\)"):
        write_sample(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["VERSION", "ner_train.tsv", "patients.csv"]
    old = tmp_path / "sample"
    old.mkdir()
    (old / "VERSION").write_text("0")  # an older sample of bioray's: replaced whole
    (old / "ner_train.tsv").write_text("old")
    assert write_sample(old) == old and (old / "VERSION").read_text() == SAMPLE_VERSION
    assert (old / "ner_train.tsv").read_text() != "old" and (old / "nli_validation.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "sample"]  # no temporary folder left


# ---------------------------------------------------------------------------------------- corpus lines


def test_a_huge_line_is_skipped_unread_and_quoted_text_is_capped(tmp_path):
    from bioray.corpus import sources

    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"sentence": "a @GENE$", "label": 1}\n' + b"y" * 5000 + b"\n"
                     + json.dumps({"sentence": "b", "label": "z" * 300}).encode() + b"\n")
    lines = list(sources.iter_lines(path, 0, path.stat().st_size, 1, max_bytes=1024))
    assert [n for n, _ in lines] == [1, 2, 3] and lines[1][1] == sources.Overlong(5001)
    out = list(sources.parse("re_masked", "jsonl", {"labels": {1: "true"}, "columns": None}, lines))
    assert isinstance(out[0], sources.Parsed)
    assert out[1] == sources.Rejected(2, "line is 5001 bytes, longer than corpus.max_line_bytes")
    assert out[2].reason.startswith("label 'zzz") and "... (300 characters) is not in" in out[2].reason
    assert len(out[2].reason) < 200


# ---------------------------------------------------------------------------------------- secrets


PLANTED = {"HF_TOKEN": "hf_plantedTOKEN0123", "AWS_SECRET_ACCESS_KEY": "planted/Secret+Key=",
           "AWS_ACCESS_KEY_ID": "AKIAPLANTEDKEYID", "AWS_ENDPOINT_URL": "http://planteduser:plantedpass@127.0.0.1:9/"}


def test_redact_masks_every_secret_of_the_environment_in_every_form():
    import base64
    from urllib.parse import quote

    from bioray.redact import redact

    text = " ".join([PLANTED["HF_TOKEN"], quote(PLANTED["AWS_SECRET_ACCESS_KEY"], safe=""),
                     base64.b64encode(PLANTED["AWS_ACCESS_KEY_ID"].encode()).decode(),
                     "Could not resolve host: planteduser", "https://someone:pw@mirror.example.org/x"])
    out = redact(text, PLANTED)
    for secret in ("hf_planted", "planted", "AKIAPLANTED", "QUtJQVBMQU5URURLRVlJRA", "someone", "pw@"):
        assert secret not in out, (secret, out)
    assert "mirror.example.org/x" in out and "Could not resolve host: ***" in out


def test_a_job_masks_a_secret_its_error_would_quote(tmp_path):
    # The config check quotes the bad value; here the value is a planted token.
    env = {**os.environ, **PLANTED}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "finetune.py"), "--set",
                           f"run.name=../{PLANTED['HF_TOKEN']}", "--set", f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "run.name" in proc.stderr and "***" in proc.stderr
    assert PLANTED["HF_TOKEN"] not in proc.stderr + proc.stdout


# ---------------------------------------------------------------------------------------- leftovers


def test_temporary_folders_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    from bioray import tempdirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {"dead": f".x.{host}.{dead.pid}.abc", "alive": f".x.{host}.{os.getpid()}.abc",
             "foreign-new": ".x.elsewhere.example.org.123.abc", "foreign-old": ".x.elsewhere.example.org.124.abc",
             "other-prefix": f".y.{host}.{dead.pid}.abc", "not-ours": ".x-something"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    week = time.time() - tempdirs.FOREIGN_AFTER_S - 60
    os.utime(tmp_path / names["foreign-old"], (week, week))
    made = tempdirs.make(tmp_path, ".x")
    assert made.name.startswith(f".x.{host}.{os.getpid()}.")
    removed = {p.name for p in tempdirs.clean_stale(tmp_path, ".x")}
    assert removed == {names["dead"], names["foreign-old"]}
    assert {p.name for p in tmp_path.iterdir()} == set(names.values()) - removed | {made.name}


# ---------------------------------------------------------------------------------------- Ray's token


def test_bioray_starts_local_ray_with_token_auth_and_a_private_token(tmp_path, monkeypatch):
    import ray

    from bioray import cli

    token = tmp_path / ".ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for var in ("RAY_TRAIN_V2_ENABLED", "RAY_DATA_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))  # restored after the test
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(mode=os.environ.get("RAY_AUTH_MODE")))
    monkeypatch.setattr(cli, "_data_progress", lambda quiet: None)
    cli.init_ray(Config())
    assert seen["mode"] == "token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
    token.chmod(0o644)  # one written by an older Ray: narrowed
    cli.init_ray(Config())
    assert token.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(BiorayError, match="RAY_AUTH_MODE=disabled: bioray runs Ray with token authentication only"):
        cli.check_auth_mode()


def test_the_secret_scan_finds_a_planted_secret(tmp_path):
    # Guards the e2e scans (tests/test_e2e.py, tests/test_tune.py): they prove nothing if this misses.
    import base64

    from conftest import PLANTED_SECRETS, assert_no_secrets

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "clean.bin").write_bytes(b"\0" * 1000)
    assert assert_no_secrets([tmp_path], ["nothing here"]) == 1
    (tmp_path / "a" / "events.bin").write_bytes(b"\0" + base64.b64encode(b"scanpass") + b"\0")
    with pytest.raises(AssertionError, match="events.bin"):
        assert_no_secrets([tmp_path])
    with pytest.raises(AssertionError, match="output 0"):
        assert_no_secrets([], [f"token {PLANTED_SECRETS['HF_TOKEN']}"])
