"""The corpus stage: every source format, every bad-input case, determinism, real data."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from bioray.config import from_dict
from bioray.corpus import build_corpus, corpus_dataset, read_manifest, read_records, render_prompt
from bioray.corpus import templates
from bioray.corpus.sources import repair_tags
from bioray.errors import ConfigError, DataError

REAL = Path(__file__).parents[1].parent / "shared/data/ner"


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(tmp_path: Path, sources: list[dict], **corpus) -> object:
    return from_dict({"run": {"dir": str(tmp_path / "run"), "quiet": True},
                      "corpus": {"sources": sources, **corpus}})


def _write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _jsonl(path: Path, rows: list) -> str:
    return _write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _rejected(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "rejected.jsonl").read_text().splitlines()]


IOB = """-DOCSTART-\tO

-DOCSTART-


Famous\tO
von\tB-Disease
Willebrand\tI-Disease
disease\tI-Disease
.\tO



IL-2\tB-protein
gene\tI-protein
in\tO
T\tB-cell_type
cells\tI-cell_type
"""


# ---------------------------------------------------------------- formats


def test_iob_untyped_docstart_and_blank_runs(tmp_path):
    f = _write(tmp_path / "a.tsv", IOB)
    cfg = _cfg(tmp_path, [{"name": "n", "format": "iob", "task": "ner", "entity": "disease",
                           "files": {"train": f}}])
    corpus = build_corpus(cfg)
    recs = read_records(corpus, "n", "train")
    assert [r["id"] for r in recs] == ["n/train/0000000", "n/train/0000001"]
    assert recs[0]["input"] == "Famous von Willebrand disease ."
    assert recs[0]["output"] == "Famous : O\nvon : B\nWillebrand : I\ndisease : I\n. : O"
    assert recs[1]["output"] == "IL-2 : B\ngene : I\nin : O\nT : B\ncells : I"
    assert all(r["task"] == "ner" and "disease" in r["instruction"] for r in recs)
    m = read_manifest(corpus)
    assert m["sources"]["n"]["labels"] == ["B", "I", "O"]
    assert m["sources"]["n"]["splits"]["train"] == {"records": 2, "rejected": 0, "file": f}


def test_iob_typed_keeps_types(tmp_path):
    f = _write(tmp_path / "a.tsv", IOB)
    cfg = _cfg(tmp_path, [{"name": "jnlpba", "format": "iob", "task": "ner", "typed": True,
                           "entity": "protein, DNA, RNA, cell_line or cell_type", "files": {"train": f}}])
    recs = read_records(build_corpus(cfg), "jnlpba", "train")
    assert recs[1]["output"] == "IL-2 : B-protein\ngene : I-protein\nin : O\nT : B-cell_type\ncells : I-cell_type"
    assert "cell_type" in recs[1]["instruction"]
    labels = read_manifest(tmp_path / "run/corpus")["sources"]["jnlpba"]["labels"]
    assert labels == ["B-Disease", "B-cell_type", "B-protein", "I-Disease", "I-cell_type", "I-protein", "O"]


def test_iob_stray_i_reads_as_seqeval_does():
    # seqeval starts an entity at an I after O, at sentence start, or on a type change.
    assert repair_tags(["I-X", "I-X", "O", "I-X", "B-X", "I-Y"], typed=True) == \
        ["B-X", "I-X", "O", "B-X", "B-X", "B-Y"]
    assert repair_tags(["I-X", "I-Y", "I", "I"], typed=False) == ["B", "B", "B", "I"]
    assert repair_tags(["B", "I", "O", "I"], typed=False) == ["B", "I", "O", "B"]


def test_re_masked_jsonl_and_tsv_with_int_and_str_keys(tmp_path):
    j = _jsonl(tmp_path / "gad.jsonl", [{"sentence": "@GENE$ causes @DISEASE$ .", "label": 1},
                                        {"sentence": "@GENE$ and @DISEASE$ .", "label": "0"}])
    t = _write(tmp_path / "euadr.tsv", "sentence\tlabel\n@GENE$ in @DISEASE$ .\t1\n\nno @GENE$ .\t0\n")
    sources = [
        {"name": "gad", "format": "re_masked", "task": "re", "labels": {0: "false", 1: "true"},
         "negative_label": "false", "files": {"train": j}},
        {"name": "euadr", "format": "re_masked", "task": "re", "labels": {"0": "no", "1": "yes"},
         "files": {"train": t}},
        {"name": "raw", "format": "re_masked", "task": "re", "files": {"train": j}},
    ]
    corpus = build_corpus(_cfg(tmp_path, sources))
    gad = read_records(corpus, "gad", "train")
    assert [(r["input"], r["output"]) for r in gad] == [("@GENE$ causes @DISEASE$ .", "true"),
                                                        ("@GENE$ and @DISEASE$ .", "false")]
    assert "false or true" in gad[0]["instruction"]
    assert [r["output"] for r in read_records(corpus, "euadr", "train")] == ["yes", "no"]
    assert [r["output"] for r in read_records(corpus, "raw", "train")] == ["1", "0"]
    m = read_manifest(corpus)["sources"]
    assert m["gad"]["labels"] == ["false", "true"] and m["raw"]["labels"] == ["0", "1"]


def test_nli(tmp_path):
    f = _jsonl(tmp_path / "mednli.jsonl", [
        {"sentence1": "He has a fever.", "sentence2": "He is febrile.", "gold_label": "entailment"},
        {"sentence1": "No pain.", "sentence2": "Severe pain.", "gold_label": "contradiction"}])
    cfg = _cfg(tmp_path, [{"name": "mednli", "format": "nli", "task": "nli", "files": {"validation": f}}])
    recs = read_records(build_corpus(cfg), "mednli", "validation")
    assert recs[0]["input"] == "Premise: He has a fever.\nHypothesis: He is febrile."
    assert [r["output"] for r in recs] == ["entailment", "contradiction"]
    assert read_manifest(tmp_path / "run/corpus")["sources"]["mednli"]["labels"] == \
        ["contradiction", "entailment", "neutral"]


def test_multilabel(tmp_path):
    f = _jsonl(tmp_path / "hoc.jsonl", [{"text": "Cells divide.", "labels": [3, 1, 3]},
                                        {"text": "Nothing here.", "labels": []}])
    labels = {1: "sustaining proliferative signaling", 3: "evading growth suppressors"}
    sources = [{"name": "hoc", "format": "multilabel", "task": "cls", "labels": labels,
                "files": {"train": f}},
               {"name": "hoc_raw", "format": "multilabel", "task": "cls", "files": {"train": f}}]
    corpus = build_corpus(_cfg(tmp_path, sources))
    # Map order (first appearance among the answer words), duplicates dropped.
    assert [r["output"] for r in read_records(corpus, "hoc", "train")] == \
        ["sustaining proliferative signaling, evading growth suppressors", "none"]
    assert [r["output"] for r in read_records(corpus, "hoc_raw", "train")] == ["1, 3", "none"]
    assert read_manifest(corpus)["sources"]["hoc"]["labels"] == sorted([*labels.values(), "none"])


def test_instructions_jsonl_parquet_and_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": "Answer yes or no.", "input": "Is aspirin an NSAID?", "output": "yes",
             "source": "pubmedqa"},
            {"instruction": "", "input": "What does BRCA1 repair?", "output": "DNA"}]
    j = _jsonl(tmp_path / "i.jsonl", rows)
    p = tmp_path / "i.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "source": "x"} for r in rows]), p)
    h = tmp_path / "hf"
    datasets.Dataset.from_list([{**r, "source": "x"} for r in rows]).save_to_disk(str(h))
    sources = [{"name": n, "format": "instructions", "task": "qa", "files": {"train": str(path)}}
               for n, path in (("j", j), ("p", p), ("h", h))]
    corpus = build_corpus(_cfg(tmp_path, sources))
    for name in ("j", "p", "h"):
        recs = read_records(corpus, name, "train")
        assert [(r["source"], r["task"], r["input"], r["output"]) for r in recs] == \
            [(name, "qa", "Is aspirin an NSAID?", "yes"), (name, "qa", "What does BRCA1 repair?", "DNA")]
        assert recs[0]["instruction"] == "Answer yes or no."
        assert recs[1]["instruction"] in templates.QA  # empty instruction: drawn from the set


def test_ner_instructions_file_needs_no_entity(tmp_path):
    # The paper's released instruction files (NCBI-disease as `instructions`, task ner) carry their
    # own instructions; before, the source was refused unless it named an entity it never uses.
    rows = [{"instruction": f"Tag the disease tokens ({i}).", "input": f"w{i} flu", "output": f"w{i} : O\nflu : B"}
            for i in range(40)]
    rows[7]["instruction"] = ""  # nothing to draw a stand-in from: rejected, naming the line
    src = [{"name": "ncbi_instr", "format": "instructions", "task": "ner", "files": {"train": _jsonl(tmp_path / "n.jsonl", rows)}}]
    corpus = build_corpus(_cfg(tmp_path, src, max_rejected_fraction=0.05))
    recs = read_records(corpus, "ncbi_instr", "train")
    assert [r["instruction"] for r in recs] == [r["instruction"] for r in rows if r["instruction"]]
    assert all(r["task"] == "ner" for r in recs)
    (bad,) = _rejected(corpus)
    assert bad["line"] == 8 and "'instruction' is empty" in bad["reason"]
    # A structured iob source still needs its entity (its instructions are bioray's).
    with pytest.raises(ConfigError, match=r"corpus.sources\[0\].entity"):
        build_corpus(_cfg(tmp_path, [{"name": "n", "format": "iob", "task": "ner", "files": {"train": str(tmp_path / "n.jsonl")}}]))


def test_custom_instructions_and_render_prompt(tmp_path):
    f = _write(tmp_path / "a.tsv", IOB)
    cfg = _cfg(tmp_path, [{"name": "n", "format": "iob", "task": "ner", "files": {"train": f},
                           "instructions": ["Tag it {x}."]}])
    assert {r["instruction"] for r in read_records(build_corpus(cfg), "n", "train")} == {"Tag it {x}."}
    prompt = render_prompt(cfg.corpus.template, "Do {input}.", "a {instruction} b")
    assert prompt == "### Instruction:\nDo {input}.\n\n### Input:\na {instruction} b\n\n### Output:\n"


def test_every_task_has_four_instructions():
    for group in (templates.NER, templates.NER_TYPED, templates.RE, templates.RE_OPEN,
                  templates.NLI, templates.CLS, templates.CLS_OPEN, templates.QA):
        assert len(set(group)) >= 4
    assert all("{entity}" in t for t in templates.NER + templates.NER_TYPED)


def test_ner_without_entity_fails_naming_the_key(tmp_path):
    f = _write(tmp_path / "a.tsv", IOB)
    cfg = _cfg(tmp_path, [{"name": "n", "format": "iob", "task": "ner", "files": {"train": f}}])
    with pytest.raises(ConfigError, match=r"corpus.sources\[0\].entity"):
        build_corpus(cfg)


def test_corpus_dataset_filters_split(tmp_path):
    f = _write(tmp_path / "a.tsv", IOB)
    cfg = _cfg(tmp_path, [{"name": "n", "format": "iob", "task": "ner", "entity": "x",
                           "files": {"train": f, "validation": f}}])
    corpus = build_corpus(cfg)
    assert corpus_dataset(corpus).count() == 4
    assert {r["split"] for r in corpus_dataset(corpus, "validation").take_all()} == {"validation"}


def test_corpus_reads_split_by_row_groups_and_skips_other_splits(tmp_path, monkeypatch):
    from bioray.corpus import build, read

    monkeypatch.setattr(build, "_ROW_GROUP_ROWS", 8)
    def sentences(n):
        return "\n\n".join(f"word{i}\tO\nsick{i}\tB-Disease" for i in range(n)) + "\n"

    train, valid = _write(tmp_path / "train.tsv", sentences(60)), _write(tmp_path / "valid.tsv", sentences(20))
    cfg = _cfg(tmp_path, [{"name": "n", "format": "iob", "task": "ner", "entity": "x",
                           "files": {"train": train, "validation": valid}}])
    corpus = build_corpus(cfg)
    shards = read.shard_paths(corpus)
    assert sum(pq.ParquetFile(p).metadata.num_row_groups for p in shards) >= 60 // 8
    want = {r["id"] for r in read_records(corpus, "n", "validation")}
    # Footer statistics leave train-only row groups out of the plan (a row group where the two
    # splits meet is read and filtered).
    plan = read.RowGroupDatasource(shards, "validation", None, rows_per_task=16)
    assert len(want) <= sum(u[2] for u in plan._units) <= len(want) + 2 * 8 < 80
    ds = corpus_dataset(corpus, "validation", columns=["id", "output"], rows_per_block=16)
    rows = ds.take_all()
    assert {r["id"] for r in rows} == want and set(rows[0]) == {"id", "output"}
    train_ds = corpus_dataset(corpus, "train", rows_per_block=16)
    assert train_ds.materialize().num_blocks() >= 60 // 16
    assert train_ds.count() == 60


def test_corpus_dataset_of_a_split_with_no_records_is_empty(tmp_path):
    f = _write(tmp_path / "a.tsv", IOB)
    corpus = build_corpus(_cfg(tmp_path, [{"name": "n", "format": "iob", "task": "ner", "entity": "x",
                                           "files": {"train": f}}]))
    assert corpus_dataset(corpus, "test", columns=["id"]).count() == 0


# ---------------------------------------------------------------- bad input


_CHAT_OK = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
BAD_CASES = [
    # (format, file name, content, line, reason fragment)
    ("iob", "x.tsv", "a\tO\nb\tO\tO\n\nc\tO\n", 2, "2 tab-separated columns"),
    ("iob", "x.tsv", "a\tO\nb\tX-Disease\n\nc\tO\n", 2, "not IOB2"),
    ("iob", "x.tsv", "a\tO\nb c\tO\n\nc\tO\n", 2, "contains whitespace"),
    ("iob", "x.tsv", "a\tO\n\tO\n\nc\tO\n", 2, "empty token"),
    ("iob", "x.tsv", b"a\tO\n\xff\xfe\tO\n\nc\tO\n", 2, "not UTF-8"),
    ("re_masked", "x.jsonl", '{"sentence": "s", "label": 0}\n{"sentence": "s", "label": 7}\n', 2,
     "not in the source's labels map"),
    ("re_masked", "x.jsonl", '{"sentence": "s", "label": 0}\n{"sentence": "s", "label": \n', 2, "invalid JSON"),
    ("re_masked", "x.jsonl", '{"sentence": "s", "label": 0}\n{"sentence": " ", "label": 0}\n', 2, "empty"),
    ("re_masked", "x.tsv", "s\t0\ns\t0\textra\n", 2, "2 tab-separated columns"),
    ("nli", "x.jsonl", '{"sentence1": "a", "sentence2": "b", "gold_label": "neutral"}\n'
                       '{"sentence1": "a", "sentence2": "b", "gold_label": "-"}\n', 2, "gold_label '-'"),
    ("nli", "x.jsonl", '{"sentence1": "a", "sentence2": "b", "gold_label": "neutral"}\n'
                       '{"sentence1": "a", "gold_label": "neutral"}\n', 2, "'sentence2' is missing"),
    ("multilabel", "x.jsonl", '{"text": "t", "labels": [0]}\n{"text": "t", "labels": [9]}\n', 2,
     "not in the source's labels map"),
    ("instructions", "x.jsonl", '{"instruction": "i", "input": "", "output": "o"}\n'
                                '{"instruction": "i", "output": "o"}\n', 2, "'input' is missing"),
    ("messages", "x.jsonl", _CHAT_OK + '{"messages": [{"role": "doctor", "content": "q"}]}\n', 2,
     "turn 1: unknown role 'doctor'"),
    ("messages", "x.jsonl", _CHAT_OK + '{"conversations": [{"from": "human", "value": "q"}]}\n', 2,
     "no assistant turn"),
    ("messages", "x.jsonl", _CHAT_OK + '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                                       '"content": "a"}, {"role": "user", "content": "q2"}]}\n', 2,
     "a user turn follows the last assistant turn"),
]
TASK = {"iob": "ner", "re_masked": "re", "nli": "nli", "multilabel": "cls", "instructions": "qa", "messages": "qa"}


def _bad_source(tmp_path, fmt, name, content):
    f = _write(tmp_path / name, content)
    s = {"name": "s", "format": fmt, "task": TASK[fmt], "entity": "thing", "files": {"train": f}}
    if fmt in ("re_masked", "multilabel"):
        s["labels"] = {0: "no"}
    return s, f


@pytest.mark.parametrize("fmt,name,content,line,reason", BAD_CASES)
def test_bad_line_is_rejected_with_file_and_line(tmp_path, fmt, name, content, line, reason):
    s, f = _bad_source(tmp_path, fmt, name, content)
    corpus = build_corpus(_cfg(tmp_path, [s], max_rejected_fraction=0.5))
    (rej,) = _rejected(corpus)
    assert (rej["source"], rej["split"], rej["file"], rej["line"]) == ("s", "train", f, line)
    assert reason in rej["reason"]
    split = read_manifest(corpus)["sources"]["s"]["splits"]["train"]
    assert split["rejected"] == 1 and split["records"] >= 1
    assert all(r["id"].endswith(f"{i:07d}") for i, r in enumerate(read_records(corpus, "s", "train")))


@pytest.mark.parametrize("fmt,name,content,line,reason", BAD_CASES[:1] + BAD_CASES[5:6])
def test_zero_threshold_fails_naming_file_and_line(tmp_path, fmt, name, content, line, reason):
    s, f = _bad_source(tmp_path, fmt, name, content)
    with pytest.raises(DataError, match=rf"^{f}:{line}: .*{reason}.*\(1 of 2 records rejected in s/train, "
                                        r"above corpus.max_rejected_fraction=0\)$"):
        build_corpus(_cfg(tmp_path, [s], max_rejected_fraction=0))
    assert (tmp_path / "run/corpus.rejected.jsonl").is_file()
    assert not (tmp_path / "run/corpus").exists()


def test_default_threshold_fails_on_a_bad_share(tmp_path):
    good = "".join(json.dumps({"sentence": f"s{i}", "label": 0}) + "\n" for i in range(500))
    s, f = _bad_source(tmp_path, "re_masked", "x.jsonl", good + '{"sentence": "s", "label": 5}\n')
    build_corpus(_cfg(tmp_path, [s], max_rejected_fraction=0.002))  # 1/501 is below 0.2%
    with pytest.raises(DataError, match=rf"{f}:501: .*above corpus.max_rejected_fraction=0.001"):
        build_corpus(_cfg(tmp_path, [s]))


def test_missing_file_names_the_key(tmp_path):
    cfg = _cfg(tmp_path, [{"name": "n", "format": "iob", "task": "ner", "entity": "x",
                           "files": {"train": str(tmp_path / "nope.tsv")}}])
    with pytest.raises(DataError, match=r"corpus.sources\[0\].files.train.*nope.tsv"):
        build_corpus(cfg)


def test_failed_rebuild_keeps_the_old_corpus(tmp_path):
    f = tmp_path / "a.tsv"
    _write(f, IOB)
    src = [{"name": "n", "format": "iob", "task": "ner", "entity": "x", "files": {"train": str(f)}}]
    corpus = build_corpus(_cfg(tmp_path, src))
    before = {p.name: p.read_bytes() for p in corpus.iterdir()}
    _write(f, IOB + "\nbad\tline\textra\n")
    with pytest.raises(DataError):
        build_corpus(_cfg(tmp_path, src, max_rejected_fraction=0))
    assert {p.name: p.read_bytes() for p in corpus.iterdir()} == before
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []


def test_a_file_of_blank_lines_fails_naming_the_key(tmp_path):
    f = _write(tmp_path / "blank.tsv", "\n\n-DOCSTART-\tO\n\n")
    cfg = _cfg(tmp_path, [{"name": "n", "format": "iob", "task": "ner", "entity": "x", "files": {"train": f}}])
    with pytest.raises(DataError, match=rf"corpus.sources\[0\].files.train': {f} holds no records"):
        build_corpus(cfg)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no corpus, no temporary folder


def test_a_manifest_cut_short_rebuilds_and_a_killed_builds_leftovers_go(tmp_path, caplog):
    import socket
    import subprocess
    import sys

    f = _write(tmp_path / "a.tsv", IOB)
    cfg = _cfg(tmp_path, [{"name": "n", "format": "iob", "task": "ner", "entity": "x", "files": {"train": f}}])
    corpus = build_corpus(cfg)
    manifest = (corpus / "manifest.json").read_text()
    (corpus / "manifest.json").write_text(manifest[: len(manifest) // 2])  # a copy cut short
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / "run" / f".corpus-tmp.{socket.gethostname()}.{dead.pid}.abcdefgh"
    (leftover / "_side").mkdir(parents=True)  # a build killed half-way
    with caplog.at_level("INFO", logger="bioray"):
        build_corpus(cfg)
    assert "building the corpus again" in caplog.text
    assert (corpus / "manifest.json").read_text() == manifest
    assert not leftover.exists() and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["corpus"]


# ---------------------------------------------------------------- reuse and determinism


def test_up_to_date_corpus_is_reused_and_changes_rebuild(tmp_path, caplog):
    f = tmp_path / "a.tsv"
    _write(f, IOB)
    src = [{"name": "n", "format": "iob", "task": "ner", "entity": "x", "files": {"train": str(f)}}]
    first = read_manifest(build_corpus(_cfg(tmp_path, src)))["content_hash"]
    with caplog.at_level("INFO", logger="bioray"):
        build_corpus(_cfg(tmp_path, src))
    assert "corpus up to date" in caplog.text
    _write(f, IOB + "\nextra\tO\n")
    assert read_manifest(build_corpus(_cfg(tmp_path, src)))["content_hash"] != first
    assert read_manifest(tmp_path / "run/corpus")["total_records"] == 3


def test_two_builds_are_identical_and_seed_changes_draws(tmp_path, monkeypatch):
    from bioray.corpus import build

    # Small ranges force several read tasks per file, exercising the counting pass.
    monkeypatch.setattr(build, "_CHUNK_BYTES", 1000)
    text = "".join(f"w{i}\tO\nx{i}\tB-Disease\n\n" for i in range(300))
    f = _write(tmp_path / "a.tsv", text)
    src = [{"name": "n", "format": "iob", "task": "ner", "entity": "x", "files": {"train": f}}]

    def records(seed):
        cfg = from_dict({"run": {"dir": str(tmp_path / f"r{seed}"), "seed": seed},
                         "corpus": {"sources": src}})
        return read_records(build_corpus(cfg, force=True), "n", "train")

    assert len(build._plan(from_dict({"corpus": {"sources": src}}))) > 3
    a, b = records(0), records(0)
    assert json.dumps(a).encode() == json.dumps(b).encode()
    assert [r["id"] for r in a] == [f"n/train/{i:07d}" for i in range(300)]
    assert all(r["input"] == f"w{i} x{i}" for i, r in enumerate(a))
    assert [r["instruction"] for r in records(1)] != [r["instruction"] for r in a]


def test_ranges_count_lines_and_records_across_cuts(tmp_path, monkeypatch):
    from bioray.corpus import build

    monkeypatch.setattr(build, "_CHUNK_BYTES", 400)
    rows = [json.dumps({"sentence": f"s{i}", "label": 0}) for i in range(60)]
    rows[47] = '{"sentence": "bad", "label": 3}'
    f = _jsonl(tmp_path / "x.jsonl", rows)
    src = [{"name": "s", "format": "re_masked", "task": "re", "labels": {0: "no"}, "files": {"train": f}}]
    corpus = build_corpus(_cfg(tmp_path, src, max_rejected_fraction=0.1))
    assert [r["line"] for r in _rejected(corpus)] == [48]
    recs = read_records(corpus, "s", "train")
    assert [r["input"] for r in recs] == [f"s{i}" for i in range(60) if i != 47]
    assert [r["id"] for r in recs] == [f"s/train/{i:07d}" for i in range(59)]


def test_iob_ranges_with_rejections_and_docstart_get_exact_ids(tmp_path, monkeypatch):
    from bioray.corpus import build

    # Rejections and mid-file -DOCSTART- lines throw the byte-level estimate off; the
    # build must notice and read again with exact offsets.
    monkeypatch.setattr(build, "_CHUNK_BYTES", 300)
    parts = []
    for i in range(120):
        parts.append("-DOCSTART-\tO\n" if i % 25 == 0 else "")
        parts.append(f"w{i}\tO\n" + ("bad\tQ\n" if i % 40 == 3 else f"x{i}\tI\n") + "\n")
    f = _write(tmp_path / "a.tsv", "".join(parts))
    src = [{"name": "n", "format": "iob", "task": "ner", "entity": "x", "files": {"train": f}}]
    corpus = build_corpus(_cfg(tmp_path, src, max_rejected_fraction=0.1))
    recs = read_records(corpus, "n", "train")
    kept = [i for i in range(120) if i % 40 != 3]
    assert [r["input"] for r in recs] == [f"w{i} x{i}" for i in kept]
    assert [r["id"] for r in recs] == [f"n/train/{k:07d}" for k in range(len(kept))]
    lines = "".join(parts).splitlines()
    assert [lines[r["line"] - 1] for r in _rejected(corpus)] == ["bad\tQ"] * 3


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real NER data not found at {REAL}")
def test_real_ner_sources(tmp_path):
    names = {"ncbi_disease": ("NCBI-disease", "disease"), "bc5cdr_chem": ("BC5CDR-chem", "chemical"),
             "bc5cdr_disease": ("BC5CDR-disease", "disease")}
    src = [{"name": n, "format": "iob", "task": "ner", "entity": e,
            "files": {"train": str(REAL / d / "train.tsv"), "validation": str(REAL / d / "devel.tsv")}}
           for n, (d, e) in names.items()]
    corpus = build_corpus(_cfg(tmp_path, src, max_rejected_fraction=0))
    m = read_manifest(corpus)
    counts = {n: {k: v["records"] for k, v in s["splits"].items()} for n, s in m["sources"].items()}
    assert counts == {"ncbi_disease": {"train": 5424, "validation": 923},
                      "bc5cdr_chem": {"train": 4560, "validation": 4581},
                      "bc5cdr_disease": {"train": 4560, "validation": 4581}}
    assert m["total_records"] == 24629 and m["total_rejected"] == 0
    for name in names:
        for split in ("train", "validation"):
            for r in read_records(corpus, name, split):
                lines = r["output"].split("\n")
                assert [ln.rsplit(" : ", 1)[0] for ln in lines] == r["input"].split(" ")
                assert all(ln.rsplit(" : ", 1)[1] in ("B", "I", "O") for ln in lines)


# ---------------------------------------------------------------- datasets sources and chat records


def test_datasets_sources_map_splits_and_columns(tmp_path):
    """A saved DatasetDict, a folder of JSON lines files (load_dataset) and a class-label NER dataset."""
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"question": ["Is aspirin an NSAID?", "What does BRCA1 repair?"],
                                             "answer": ["yes", "DNA"]}),
        "dev": datasets.Dataset.from_dict({"question": ["Is insulin a hormone?"], "answer": ["yes"]}),
    }).save_to_disk(str(saved))
    files = tmp_path / "files"
    _jsonl(files / "train.jsonl", [{"premise": "a", "hypothesis": "b", "label": "neutral"},
                                   {"premise": "c", "hypothesis": "d", "label": "entailment"}])
    _jsonl(files / "test.jsonl", [{"premise": "e", "hypothesis": "f", "label": "contradiction"}])
    ner = tmp_path / "ner"
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-Disease",
                                                                                           "I-Disease"]))})
    datasets.Dataset.from_dict({"tokens": [["cystic", "fibrosis", "again"]], "ner_tags": [[1, 2, 0]]},
                               features=features).save_to_disk(str(ner))
    chat = tmp_path / "chat"
    datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "Is it benign?"},
                                                   {"from": "gpt", "value": "no"}]}]).save_to_disk(str(chat))
    sources = [
        {"name": "chat", "format": "messages", "task": "qa", "dataset": str(chat), "splits": {"train": "train"}},
        {"name": "qa", "format": "instructions", "task": "qa", "dataset": str(saved),
         "splits": {"train": "train", "validation": "dev"}, "columns": {"input": "question", "output": "answer"}},
        {"name": "nli", "format": "nli", "task": "nli", "dataset": str(files), "splits": {"train": "train", "test": "test"},
         "columns": {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"}},
        {"name": "ner", "format": "iob", "task": "ner", "entity": "disease", "typed": True, "dataset": str(ner),
         "splits": {"train": "train"}, "columns": {"tags": "ner_tags"}},
    ]
    corpus = build_corpus(_cfg(tmp_path, sources))
    qa = read_records(corpus, "qa", "validation")
    assert [(r["id"], r["input"], r["output"]) for r in qa] == [("qa/validation/0000000", "Is insulin a hormone?", "yes")]
    assert qa[0]["instruction"] in templates.QA  # no instruction column: drawn from the set
    assert [r["input"] for r in read_records(corpus, "qa", "train")] == ["Is aspirin an NSAID?", "What does BRCA1 repair?"]
    assert [(r["input"], r["output"]) for r in read_records(corpus, "nli", "test")] == \
        [("Premise: e\nHypothesis: f", "contradiction")]
    (sent,) = read_records(corpus, "ner", "train")
    assert (sent["input"], sent["output"]) == ("cystic fibrosis again",
                                               "cystic : B-Disease\nfibrosis : I-Disease\nagain : O")
    assert [(r["instruction"], r["input"], r["output"]) for r in read_records(corpus, "chat", "train")] == \
        [("", "Is it benign?", "no")]
    manifest = read_manifest(corpus)["sources"]
    assert manifest["qa"]["splits"]["validation"] == {"records": 1, "rejected": 0, "file": f"{saved}[dev]"}
    assert manifest["nli"]["splits"]["train"]["records"] == 2
    # Edited data rebuilds (the hash covers a local dataset's files).
    digest = read_manifest(corpus)["content_hash"]
    _jsonl(files / "test.jsonl", [{"premise": "e", "hypothesis": "g", "label": "neutral"}])
    assert read_manifest(build_corpus(_cfg(tmp_path, sources)))["content_hash"] != digest


@pytest.mark.parametrize("change, says", [
    ({"splits": {"train": "train", "validation": "dev"}},
     r"^config key 'corpus.sources\[0\].splits.validation': .*files has no split 'dev' \(it has: test, train\)$"),
    ({"columns": {"sentence1": "premise"}},
     r"^config key 'corpus.sources\[0\].columns': .*files\[train\] has no column 'sentence2' for field 'sentence2' of "
     r"format nli \(its columns: premise, hypothesis, label\); map one in columns$"),
    ({"dataset": "./nowhere"}, r"^config key 'corpus.sources\[0\].dataset': folder not found: ./nowhere$"),
])
def test_a_dataset_without_the_split_or_column_fails_naming_the_key(tmp_path, change, says):
    files = tmp_path / "files"
    for split in ("train", "test"):
        _jsonl(files / f"{split}.jsonl", [{"premise": "a", "hypothesis": "b", "label": "neutral"}])
    source = {"name": "nli", "format": "nli", "task": "nli", "dataset": str(files), "splits": {"train": "train"},
              "columns": {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"}, **change}
    with pytest.raises(DataError, match=says):
        build_corpus(_cfg(tmp_path, [source]))
    assert not (tmp_path / "run/corpus").exists()


def test_messages_openai_and_sharegpt_records(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Is aspirin an NSAID?"},
                      {"role": "assistant", "content": "yes"}]},
        {"conversations": [{"from": "human", "value": "What does BRCA1 repair?"}, {"from": "gpt", "value": "DNA"}]},
        {"messages": [{"role": "user", "content": "Name a statin."}, {"role": "assistant", "content": "atorvastatin"},
                      {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "simvastatin"}]},
    ]
    src = [{"name": "chat", "format": "messages", "task": "qa", "files": {"train": _jsonl(tmp_path / "c.jsonl", rows)}}]
    recs = read_records(build_corpus(_cfg(tmp_path, src)), "chat", "train")
    assert [(r["instruction"], r["input"], r["output"]) for r in recs] == [
        ("Answer briefly.", "Is aspirin an NSAID?", "yes"),
        ("", "What does BRCA1 repair?", "DNA"),  # no system turn: no instruction (none is drawn)
        ("", "User: Name a statin.\n\nAssistant: atorvastatin\n\nUser: Another?", "simvastatin"),
    ]
