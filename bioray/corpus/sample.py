"""The embedded sample corpus: small, synthetic, learnable biomedical sources.

The quickstart must run with no download and prove that the whole stack learns on 2 CPU cores,
so bioray writes its own sample files here, in the same formats users bring (``iob``,
``re_masked``, ``nli``), and the normal readers load them. Sentences are short and the
vocabulary small, so a tiny model pretrained for a minute can learn the tasks. Generation is
deterministic: the same version writes byte-identical files on every machine.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from bioray import tempdirs
from bioray.errors import ConfigError

SAMPLE_VERSION = "1"
SPLIT_SIZES = {"train": 480, "validation": 80}
STAMP = "VERSION"
# Every name a sample folder holds: a folder holding anything else is not bioray's to replace.
SAMPLE_FILES = frozenset({STAMP} | {f"{kind}_{split}.{ext}" for split in SPLIT_SIZES
                                    for kind, ext in (("ner", "tsv"), ("re", "jsonl"), ("nli", "jsonl"))})
TMP_NAME, OLD_NAME = ".sample-tmp", ".sample-old"

_DISEASES = [
    ["asthma"], ["diabetes"], ["cancer"], ["anemia"], ["hepatitis"], ["lupus"],
    ["breast", "cancer"], ["cystic", "fibrosis"], ["sickle", "cell", "anemia"],
    ["heart", "failure"], ["lung", "cancer"], ["kidney", "disease"], ["colon", "cancer"],
    ["huntington", "disease"], ["multiple", "sclerosis"], ["liver", "fibrosis"],
]
_DRUGS = ["aspirin", "insulin", "metformin", "heparin", "warfarin", "cisplatin"]
_PEOPLE = ["the patient", "a woman", "a man", "the child", "her father", "his mother"]
_NER_FRAMES = [
    "{p} was diagnosed with {d} last year .",
    "{p} has a history of {d} .",
    "treatment of {d} with {x} was started .",
    "{p} developed {d} after surgery .",
    "no signs of {d} were found in {p} .",
    "{x} reduced the risk of {d} .",
    "{p} with {d} received {x} .",
    "screening for {d} is advised .",
]
_RE_POSITIVE = [
    "mutations in @GENE$ cause @DISEASE$ .",
    "@GENE$ variants increase the risk of @DISEASE$ .",
    "@GENE$ is associated with @DISEASE$ in {n} patients .",
    "loss of @GENE$ leads to @DISEASE$ .",
]
_RE_NEGATIVE = [
    "@GENE$ was not associated with @DISEASE$ .",
    "no link between @GENE$ and @DISEASE$ was found .",
    "@GENE$ levels were normal in {n} patients with @DISEASE$ .",
    "@GENE$ and @DISEASE$ were studied separately .",
]
_NLI = {
    "entailment": [("{p} has {d} and takes {x} .", "{p} has {d} ."),
                   ("{p} was treated with {x} for {d} .", "{p} received {x} .")],
    "contradiction": [("{p} has {d} and takes {x} .", "{p} does not have {d} ."),
                      ("{p} was treated with {x} for {d} .", "{p} never received {x} .")],
    "neutral": [("{p} has {d} and takes {x} .", "{p} has a family history of {e} ."),
                ("{p} was treated with {x} for {d} .", "{p} also has {e} .")],
}


def _ner_sentence(rng: random.Random) -> list[tuple[str, str]]:
    frame = rng.choice(_NER_FRAMES)
    disease = rng.choice(_DISEASES)
    words = frame.format(p=rng.choice(_PEOPLE), d="\0", x=rng.choice(_DRUGS)).split(" ")
    rows: list[tuple[str, str]] = []
    for word in words:
        if word == "\0":
            rows += [(w, "B-Disease" if i == 0 else "I-Disease") for i, w in enumerate(disease)]
        else:
            rows.append((word, "O"))
    return rows


def _write_ner(path: Path, n: int, rng: random.Random) -> None:
    lines = ["-DOCSTART-\tO", ""]
    for _ in range(n):
        lines += [f"{tok}\t{tag}" for tok, tag in _ner_sentence(rng)] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _write_re(path: Path, n: int, rng: random.Random) -> None:
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            label = rng.randint(0, 1)
            frame = rng.choice(_RE_POSITIVE if label else _RE_NEGATIVE)
            f.write(json.dumps({"sentence": frame.format(n=rng.randint(2, 90)), "label": label}) + "\n")


def _write_nli(path: Path, n: int, rng: random.Random) -> None:
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            label = rng.choice(sorted(_NLI))
            premise, hypothesis = rng.choice(_NLI[label])
            d, e = rng.sample(_DISEASES, 2)
            slots = dict(p=rng.choice(_PEOPLE), d=" ".join(d), e=" ".join(e), x=rng.choice(_DRUGS))
            f.write(json.dumps({"sentence1": premise.format(**slots), "sentence2": hypothesis.format(**slots),
                                "gold_label": label}) + "\n")


def check_sample_dir(directory: str | Path) -> bool:
    """Whether ``directory`` already holds this version of the sample; refuses a folder that is not bioray's.

    A folder bioray may replace holds its stamp (``VERSION``) and nothing but sample files: pointing
    ``corpus.sample_dir`` at a real data folder must not lose that folder.

    Raises:
        ConfigError: ``directory`` is a file, or a folder with anything bioray did not write.
    """
    directory = Path(directory)
    if not directory.exists():
        return False
    key = "config key 'corpus.sample_dir'"
    if not directory.is_dir():
        raise ConfigError(f"{key}: {directory} is a file; expected a folder for bioray's sample files")
    names = {p.name for p in directory.iterdir()}
    if not names:
        return False
    new = "point corpus.sample_dir at a new folder (bioray replaces its sample folder whole)"
    foreign = sorted(names - SAMPLE_FILES)
    if foreign:
        raise ConfigError(f"{key}: {directory} holds files bioray did not write ({', '.join(foreign[:3])}); {new}")
    if STAMP not in names:
        raise ConfigError(f"{key}: {directory} is not a sample folder bioray wrote (no {STAMP} file); {new}")
    return (directory / STAMP).read_text() == SAMPLE_VERSION


def write_sample(directory: str | Path) -> Path:
    """Writes the sample source files into ``directory`` unless this version is already there.

    Files: ``ner_{split}.tsv`` (iob, Disease), ``re_{split}.jsonl`` (re_masked, labels 0/1) and
    ``nli_{split}.jsonl`` for the train and validation splits.

    Returns:
        The directory, as an absolute path.

    Raises:
        ConfigError: ``directory`` exists and is not a sample folder bioray wrote (:func:`check_sample_dir`).
    """
    directory = Path(directory).resolve()
    if check_sample_dir(directory):
        return directory
    for name in (TMP_NAME, OLD_NAME):
        tempdirs.clean_stale(directory.parent, name)
    tmp = tempdirs.make(directory.parent, TMP_NAME)
    for offset, (split, n) in enumerate(SPLIT_SIZES.items()):
        # One generator per file, seeded by its name: files do not depend on each other.
        _write_ner(tmp / f"ner_{split}.tsv", n, random.Random(f"ner-{split}-{offset}"))
        _write_re(tmp / f"re_{split}.jsonl", n, random.Random(f"re-{split}-{offset}"))
        _write_nli(tmp / f"nli_{split}.jsonl", n, random.Random(f"nli-{split}-{offset}"))
    (tmp / STAMP).write_text(SAMPLE_VERSION)
    if directory.exists():
        # An older version, or empty: replace it whole (check_sample_dir: the files are ours, generated).
        old = tempdirs.make(directory.parent, OLD_NAME)
        os.replace(directory, old / "d")
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.replace(tmp, directory)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
