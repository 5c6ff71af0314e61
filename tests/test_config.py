"""The config schema: defaults, YAML, --set overrides, and errors that name the key."""

import subprocess
import sys

import pytest

from bioray.config import Config, MixtureSection, apply_override, dump, from_dict, load, to_dict
from bioray.errors import ConfigError
from conftest import ROOT


def test_defaults_round_trip_through_a_plain_dict():
    cfg = Config()
    assert from_dict(to_dict(cfg)) == cfg
    assert "max_seq_len: 512" in dump(cfg)


def test_quickstart_loads_and_overrides_apply_in_order(tmp_path):
    cfg = load(ROOT / "configs" / "quickstart.yaml",
               ["train.lr=2e-4", "lora.target_modules=[q_proj,v_proj]", "train.lr=3e-4",
                "corpus.sources.0.entity=illness", "mixture.weights.sample_clinical_nli=0.5"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.corpus.sources[0].entity == "illness"
    assert cfg.mixture.weights["sample_clinical_nli"] == 0.5
    assert [s.name for s in cfg.corpus.sources] == ["sample_disease_ner", "sample_gene_disease_re",
                                                    "sample_clinical_nli"]


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("train.lr=fast", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.use_gpu=maybe", "train.use_gpu"),
    ("lora.rank=-4", "lora.rank"),
    ("lora.target_modules=q_proj", "lora.target_modules"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("eval.decoding=beam", "eval.decoding"),
    ("data.overlong=cut", "data.overlong"),
    ("data.tokenise_tasks=0", "data.tokenise_tasks"),
    ("data.tokenise_cpus=0", "data.tokenise_cpus"),
    ("data.tokenise_batch_size=0", "data.tokenise_batch_size"),
    ("tune.scheduler=pbt", "tune.scheduler"),
    ("tune.lr=[0.1, 0.001]", "tune.lr"),
    ("tune.rank=[]", "tune.rank"),
    ("tune.trial_cpus=0", "tune.trial_cpus"),
    ("tune.space={train.nope: {choice: [1]}}", "tune.space.train.nope"),
    ("tune.space={train.lr: {normal: [0, 1]}}", "tune.space.train.lr"),
    ("mixture.weights.nope=1", "mixture.weights.nope"),
    ("mixture.weights.sample_clinical_nli=-1", "mixture.weights.sample_clinical_nli"),
    ("mixture.weights.sample_clinical_nli=.nan", "mixture.weights.sample_clinical_nli"),
    ("corpus.sources.0.format=conll", "corpus.sources[0].format"),
    ("corpus.sources.0.dataset=bigbio/ncbi_disease", "corpus.sources[0].files"),  # files or a dataset, not both
    ("corpus.sources.0.splits={train: train}", "corpus.sources[0].splits"),  # a dataset's only
    ("corpus.sources.1.columns={sentence: text, gold: label}", "corpus.sources[1].columns"),  # not an re field
    ("corpus.template=chat", "corpus.template"),  # the tiny base's tokenizer has no chat template
    ("corpus.system_prompt=Be brief.", "corpus.system_prompt"),  # a layout has no system turn
    ("corpus.sources.7.name=x", "corpus.sources.7"),
    ("corpus.sources.1.name=sample_disease_ner", "corpus.sources[1].name"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load(ROOT / "configs" / "quickstart.yaml", [override])
    assert key in str(e.value)


def test_a_renamed_key_still_loads_with_a_warning(caplog):
    cfg = load(ROOT / "configs" / "quickstart.yaml", ["data.tokenise_actors=3"])
    assert cfg.data.tokenise_tasks == 3
    assert "data.tokenise_tasks" in caplog.text
    with pytest.raises(ConfigError, match="data.tokenise_tasks"):
        load(ROOT / "configs" / "quickstart.yaml", ["data.tokenise_actors=0"])
    caplog.clear()
    load(ROOT / "configs" / "quickstart.yaml", ["corpus.records_per_shard=10"])  # dropped: ignored
    assert "corpus.records_per_shard" in caplog.text


def test_all_zero_weights_fail():
    zero = ["mixture.weights={sample_disease_ner: 0, sample_gene_disease_re: 0, sample_clinical_nli: 0}"]
    with pytest.raises(ConfigError, match="mixture.weights"):
        load(ROOT / "configs" / "quickstart.yaml", zero)


def test_a_missing_mixture_weight_counts_as_one():
    m = MixtureSection(weights={"ner_a": 0.5, "dropped": 0.0})
    assert (m.weight("ner_a"), m.weight("dropped"), m.weight("unlisted")) == (0.5, 0.0, 1.0)


@pytest.mark.parametrize("by, weights, expected", [
    ("source", {"sample_disease_ner": 0.5}, (0.5, 1.0, 1.0)),
    ("task", {"re": 0.25, "nli": 0}, (1.0, 0.25, 0.0)),  # ner unlisted: 1.0
])
def test_source_weight_keys_on_the_source_or_its_task(by, weights, expected):
    cfg = load(ROOT / "configs" / "quickstart.yaml", [f"mixture.by={by}", f"mixture.weights={weights}"])
    names = ["sample_disease_ner", "sample_gene_disease_re", "sample_clinical_nli"]
    assert tuple(cfg.source_weight(n) for n in names) == expected
    with pytest.raises(KeyError, match="nope"):
        cfg.source_weight("nope")


# A search builds the corpus, base model, tokenised cache and scorer pool once from the base
# config: a trial's value for these keys would never be used.
@pytest.mark.parametrize("key, why", [
    ("eval.max_examples", "eval.* is built once for the whole search (the scorer pool)"),
    ("data.max_seq_len", "data.max_seq_len is built once for the whole search (the tokenised cache)"),
    ("corpus.template", "corpus.* is built once for the whole search (the corpus)"),
    ("model.name_or_path", "model.* is built once for the whole search (the base model)"),
    ("model.tiny.hidden_size", "model.* is built once for the whole search (the base model)"),
    ("run.seed", "run.* belongs to the whole search (its folder, seed and storage)"),
])
def test_tune_space_refuses_keys_a_trial_cannot_change(key, why):
    with pytest.raises(ConfigError) as e:
        load(ROOT / "configs" / "quickstart.yaml", [f"tune.space={{{key}: {{choice: [1, 2]}}}}"])
    assert str(e.value) == (f"config key 'tune.space.{key}': not searchable: {why}; "
                            "searchable keys are train.*, lora.*, mixture.* and data.packing")


def test_tune_space_accepts_keys_a_trial_applies():
    space = ("{train.warmup_steps: {choice: [0, 20]}, lora.dropout: {uniform: [0.0, 0.1]}, "
             "data.packing: {choice: [true, false]}, mixture.replacement: {choice: [true, false]}}")
    cfg = load(ROOT / "configs" / "quickstart.yaml", [f"tune.space={space}"])
    assert list(cfg.tune.space) == ["train.warmup_steps", "lora.dropout", "data.packing", "mixture.replacement"]


def test_tune_space_refuses_methods_of_a_section():
    with pytest.raises(ConfigError, match="tune.space.mixture.weight': expected a config key"):
        load(ROOT / "configs" / "quickstart.yaml", ["tune.space={mixture.weight: {choice: [1]}}"])


def test_override_needs_key_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "train.lr")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-3\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load(bad)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load("/nonexistent/x.yaml")


@pytest.mark.parametrize("job", ["prepare.py", "finetune.py", "evaluate.py", "tune.py"])
def test_jobs_exit_2_with_one_line_naming_the_key(job, tmp_path):
    extra = ["--predictions", str(tmp_path / "p.jsonl")] if job == "evaluate.py" else []
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--set", "train.lr=fast",
                           "--set", f"run.dir={tmp_path / 'run'}", *extra], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lr" in lines[0] and "a number" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the config is checked


def test_config_reference_is_up_to_date():
    from bioray.config import reference_markdown

    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown() + "\n", \
        "docs/config.md is stale: python -m bioray.config > docs/config.md"


def test_a_packaged_config_loads_by_name_from_any_folder(tmp_path, monkeypatch):
    from bioray.config import config_file, packaged_configs

    monkeypatch.chdir(tmp_path)
    assert packaged_configs() == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert config_file("quickstart") == config_file("quickstart.yaml") == ROOT / "bioray" / "configs" / "quickstart.yaml"
    assert load("quickstart") == load(ROOT / "configs" / "quickstart.yaml")
    (tmp_path / "quickstart.yaml").write_text("run: {dir: mine}\n")  # a file that exists is a file
    assert load("quickstart.yaml").run.dir == "mine" and load("quickstart").run.dir == "runs/quickstart"
    with pytest.raises(ConfigError, match=r"^quickstrat: config file not found \(nor a packaged config: "
                                          r"llama2-7b-lora, ner-real, quickstart\)$"):
        load("quickstrat")
    with pytest.raises(ConfigError, match=r"^sub/quickstart: config file not found$"):
        load("sub/quickstart")  # a path with a folder is never a packaged name


def _sources_at(path: str) -> dict:
    return {"corpus": {"sources": [{"name": "a", "files": {"train": path, "test": "plain/test.tsv"}}]}}


def test_bioray_data_in_source_paths_is_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BIORAY_DATA", str(tmp_path / "root"))
    cfg = from_dict(_sources_at("${BIORAY_DATA}/ner/X/train.tsv"))
    assert cfg.corpus.sources[0].files == {"train": f"{tmp_path}/root/ner/X/train.tsv", "test": "plain/test.tsv"}
    assert from_dict(to_dict(cfg)) == cfg  # what crosses to workers is already resolved

    monkeypatch.delenv("BIORAY_DATA")  # unset: the user's data dir (XDG), bioray's folder in it
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert from_dict(_sources_at("${BIORAY_DATA}/t.tsv")).corpus.sources[0].files["train"] == f"{tmp_path}/xdg/bioray/t.tsv"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert from_dict(_sources_at("${BIORAY_DATA}/t.tsv")).corpus.sources[0].files["train"] == \
        f"{tmp_path}/home/.local/share/bioray/t.tsv"


def test_ner_real_reads_the_shared_data_through_bioray_data(shared_data, monkeypatch):
    monkeypatch.setenv("BIORAY_DATA", str(shared_data))
    cfg = load(ROOT / "configs" / "ner-real.yaml")
    paths = [p for s in cfg.corpus.sources for p in s.files.values()]
    assert len(paths) == 6 and all(p.startswith(f"{shared_data.resolve()}/ner/") for p in paths)
    assert all((shared_data / "ner").joinpath(*p.split("/ner/", 1)[1].split("/")).is_file() for p in paths)


def test_a_corpus_not_fetched_yet_fails_naming_the_key_and_the_fetch(tmp_path, monkeypatch):
    from bioray.corpus.sources import check_files
    from bioray.errors import DataError

    monkeypatch.setenv("BIORAY_DATA", str(tmp_path))
    cfg = load(ROOT / "configs" / "ner-real.yaml")
    with pytest.raises(DataError, match=rf"^config key 'corpus.sources\[0\].files.train': file not found: "
                                        rf"{tmp_path}/ner/NCBI-disease/train.tsv \(under BIORAY_DATA=.*bioray data fetch"):
        check_files(cfg)
