"""benchmarks/answer_free_quickstart.py: its made-up NER corpus is what the experiment says it is (seconds)."""

import importlib.util
from pathlib import Path

from bioray.corpus.sources import Parsed, parse_iob
from conftest import ROOT

spec = importlib.util.spec_from_file_location("answer_free", ROOT / "benchmarks" / "answer_free_quickstart.py")
af = importlib.util.module_from_spec(spec)
spec.loader.exec_module(af)


def _sentences(path: Path) -> list[Parsed]:
    lines = enumerate(path.read_bytes().split(b"\n"), 1)
    return list(parse_iob(lines, typed=False))


def test_the_mentions_are_whole_made_up_names_and_bioray_reads_them_back(tmp_path):
    diseases, drugs = af.made_up_names()
    assert len(diseases) == 300 and len(drugs) == 59  # 60 drawn, one drawn twice
    af.write_ner(tmp_path / "train.tsv", 50, "ner-train")
    sentences = _sentences(tmp_path / "train.tsv")
    assert len(sentences) == 50 and all(isinstance(s, Parsed) for s in sentences)
    names = {" ".join(d) for d in diseases}
    with_mention = 0
    for s in sentences:
        tags = [line.rsplit(" : ", 1)[1] for line in s.output.splitlines()]
        tokens = s.input.split(" ")
        assert tags.count("B") <= 1, s  # one frame slot for a disease, two frames without one
        if "B" not in tags:
            continue
        with_mention += 1
        start = tags.index("B")
        end = start + 1 + len([t for t in tags[start + 1:] if t == "I"])
        assert " ".join(tokens[start:end]) in names  # the mention is a whole made-up name
    assert with_mention >= 35  # 8 of the 10 frames hold one
    # Made up: none of them is a word of the quickstart's sample corpus.
    sample = (ROOT / "bioray" / "corpus" / "sample.py").read_text()
    assert not [n for n in names if f'"{n.split()[0]}"' in sample]


def test_the_corpus_is_the_same_on_every_run(tmp_path):
    af.write_ner(tmp_path / "a.tsv", 30, "ner-val")
    af.write_ner(tmp_path / "b.tsv", 30, "ner-val")
    af.write_ner(tmp_path / "c.tsv", 30, "ner-train")
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    assert (tmp_path / "a.tsv").read_bytes() != (tmp_path / "c.tsv").read_bytes()
