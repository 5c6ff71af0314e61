"""Metrics equal their references: seqeval on real NER data, hand-computed cases elsewhere."""

import random
import warnings
from pathlib import Path

import pytest

from bioray.errors import DataError
from bioray.evaluate.metrics import (
    PRIMARY_METRIC,
    accuracy,
    checkpoint_score,
    entity_prf,
    micro_f1,
    multilabel_micro_f1,
    score_source,
)

seqeval_metrics = pytest.importorskip("seqeval.metrics", reason="seqeval is the NER reference")

NER_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ner"
NER_FILES = sorted(NER_DATA.glob("*/devel.tsv")) if NER_DATA.is_dir() else []
MAX_SENTENCES = 1500  # keeps the suite fast; still thousands of real entities per file
RATES = [0.02, 0.1, 0.4]


def seqeval_prf(gold, pred):
    with warnings.catch_warnings():
        # seqeval warns on odd tags and zero division; both cases are what is being compared.
        warnings.simplefilter("ignore")
        return {
            "precision": seqeval_metrics.precision_score(gold, pred),
            "recall": seqeval_metrics.recall_score(gold, pred),
            "f1": seqeval_metrics.f1_score(gold, pred),
        }


def assert_same(ours, reference):
    for key, value in reference.items():
        assert ours[key] == pytest.approx(float(value), abs=1e-12), key


def read_iob(path):
    """Sentences of (token, tag) from a CoNLL-style file, -DOCSTART- lines dropped."""
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if current:
                sentences.append(current)
            current = []
        elif not line.startswith("-DOCSTART-"):
            token, tag = line.split("\t")
            current.append((token, tag))
    if current:
        sentences.append(current)
    return sentences[:MAX_SENTENCES]


@pytest.fixture(scope="module", params=NER_FILES or [None], ids=lambda p: p and p.parent.name)
def ner_sentences(request):
    if request.param is None:
        pytest.skip(f"no NER data: {NER_DATA}/*/devel.tsv is absent (../shared/data)")
    return read_iob(request.param)


def plain(tags):
    return [tag[0] for tag in tags]


def typed(tags):
    return [tag if tag == "O" else f"{tag[0]}-Entity" for tag in tags]


def perturb(tags, rate, rng, types):
    """Corrupts a tag sequence the ways a model does; several corruptions may stack."""
    out = list(tags)
    for i in range(len(out)):
        if rng.random() >= rate:
            continue
        kind, suffix = rng.randrange(7), rng.choice(types)
        tag = out[i]
        if kind == 0 and tag[0] == "B":  # B -> I
            out[i] = "I" + tag[1:]
        elif kind == 1 and tag[0] == "I":  # I -> O
            out[i] = "O"
        elif kind == 2 and tag == "O":  # O -> B/I (an I after O starts an entity)
            out[i] = rng.choice("BI") + suffix
        elif kind == 3 and tag[0] == "B":  # drop the entity
            j = i
            while j < len(out) and (j == i or out[j][0] == "I"):
                out[j] = "O"
                j += 1
        elif kind == 4 and tag != "O" and i + 1 < len(out):  # shift right boundary
            out[i + 1] = "I" + tag[1:] if out[i + 1] == "O" else "O"
        elif kind == 5 and tag[0] == "B" and i > 0:  # shift left boundary
            out[i - 1], out[i] = tag, "I" + tag[1:]
        elif kind == 6 and tag != "O":  # mixed types inside an entity
            out[i] = tag[0] + suffix
    return out


VARIANTS = {
    "as_is": (lambda tags: tags, None),
    "plain": (plain, [""]),
    "typed": (typed, ["-Entity", "-Other"]),
}


def gold_and_pred(sentences, variant, rate, seed):
    convert, types = VARIANTS[variant]
    gold = [convert([tag for _, tag in sentence]) for sentence in sentences]
    if types is None:
        types = sorted({tag[1:] for sentence in gold for tag in sentence if tag != "O"})
        types += ["-Other"]
    rng = random.Random(seed)
    return gold, [perturb(tags, rate, rng, types) for tags in gold]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_entity_prf_equals_seqeval_on_real_data(ner_sentences, variant):
    for seed, rate in enumerate(RATES):
        gold, pred = gold_and_pred(ner_sentences, variant, rate, seed)
        assert_same(entity_prf(gold, pred), seqeval_prf(gold, pred))
        # Swapping roles exercises the chunker on the corrupted side as gold too.
        assert_same(entity_prf(pred, gold), seqeval_prf(pred, gold))


def test_score_source_equals_seqeval_on_real_data(ner_sentences):
    gold, pred = gold_and_pred(ner_sentences, "as_is", 0.1, seed=7)
    rng = random.Random(3)
    inputs, golds, predictions, broken = [], [], [], 0
    for sentence, gold_tags, pred_tags in zip(ner_sentences, gold, pred):
        tokens = [token for token, _ in sentence]
        inputs.append(" ".join(tokens))
        golds.append(lines(tokens, gold_tags))
        answer = lines(tokens, pred_tags).split("\n")
        outside = [i for i, tag in enumerate(pred_tags) if tag == "O"]
        if outside and rng.random() < 0.2:
            # A dropped 'O' line still reads back as 'O', but the answer is not well-formed.
            del answer[rng.choice(outside)]
            broken += 1
        predictions.append("\n".join(answer) + "\n")
    scores = score_source("ner", inputs, golds, predictions)
    assert_same(scores, seqeval_prf(gold, pred))
    assert scores["n"] == len(inputs) and isinstance(scores["n"], int)
    assert scores["parse_rate"] == pytest.approx(1 - broken / len(inputs))


def lines(tokens, tags):
    return "\n".join(f"{token} : {tag}" for token, tag in zip(tokens, tags))


def test_entity_prf_equals_seqeval_on_odd_tags():
    # E-/S- tags, untyped tags, unknown prefixes and types all chunk as seqeval chunks them.
    vocabulary = ["O", "B", "I", "E", "S", "B-x", "I-x", "E-x", "S-x", "B-y", "I-y", "E-y",
                  "S-y", "X-x", "X", ".", "Bx", "I-x-y", "U-y"]
    rng = random.Random(5)
    for _ in range(200):
        lengths = [rng.randint(0, 6) for _ in range(rng.randint(1, 5))]
        gold = [[rng.choice(vocabulary) for _ in range(n)] for n in lengths]
        pred = [[rng.choice(vocabulary) for _ in range(n)] for n in lengths]
        assert_same(entity_prf(gold, pred), seqeval_prf(gold, pred))


@pytest.mark.parametrize(
    "gold, pred, expected",
    [
        ([["O", "O"]], [["O", "O"]], (0.0, 0.0, 0.0)),  # nothing anywhere: zero division
        ([["B-a", "I-a", "O"]], [["O", "O", "O"]], (0.0, 0.0, 0.0)),
        ([["B-a", "I-a", "O"]], [["I-a", "I-a", "O"]], (1.0, 1.0, 1.0)),  # I after O starts
        ([["B-a", "I-a"]], [["B-a", "I-b"]], (0.0, 0.0, 0.0)),  # type change splits
        ([["B", "I", "O", "B"]], [["B", "I", "O", "O"]], (1.0, 0.5, 2 / 3)),
        ([["B-a"], ["I-a"]], [["B-a"], ["I-a"]], (1.0, 1.0, 1.0)),  # no entity across sentences
    ],
)
def test_entity_prf_small_cases(gold, pred, expected):
    ours = entity_prf(gold, pred)
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx(expected)


def test_entity_prf_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        entity_prf([["O"]], [["O", "O"]])


def test_micro_f1_without_negative_label_is_accuracy():
    gold = ["a", "b", "c", "a", "b"]
    pred = ["a", "c", "c", "a", "a"]
    assert micro_f1(gold, pred, None) == pytest.approx(3 / 5)
    assert accuracy(gold, pred) == pytest.approx(3 / 5)


def test_micro_f1_leaves_out_the_negative_label():
    gold = ["false", "CPR:3", "CPR:4", "false", "CPR:3", "false"]
    pred = ["false", "CPR:3", "false", "CPR:4", "CPR:4", "false"]
    # Positive predictions: CPR:3 (right), CPR:4 (wrong), CPR:4 (wrong) -> P = 1/3.
    # Positive gold: CPR:3, CPR:4, CPR:3 -> R = 1/3. Correct negatives do not count.
    assert micro_f1(gold, pred, "false") == pytest.approx(1 / 3)
    assert accuracy(gold, pred) == pytest.approx(3 / 6)


def test_micro_f1_unparsed_prediction_is_wrong_and_predicts_nothing():
    gold = ["x", "x", "y", "neg"]
    pred = ["x", None, None, None]
    # P = 1/1, R = 1/3 -> F1 = 2 * 1 * (1/3) / (4/3) = 0.5
    assert micro_f1(gold, pred, "neg") == pytest.approx(0.5)
    # Without a negative label: P = 1/1, R = 1/4 -> F1 = 0.4.
    assert micro_f1(gold, pred, None) == pytest.approx(0.4)
    assert accuracy(gold, pred) == pytest.approx(0.25)


def test_micro_f1_degenerate_cases():
    assert micro_f1([], [], None) == 0.0
    assert micro_f1(["neg", "neg"], ["neg", "neg"], "neg") == 0.0
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        micro_f1(["a"], [], None)


def test_multilabel_micro_f1_by_hand():
    gold = [frozenset({"a", "b"}), frozenset(), frozenset({"c"})]
    pred = [frozenset({"a"}), frozenset({"b"}), frozenset({"c", "a"})]
    # tp = 2, predicted = 4, gold = 3 -> P = 1/2, R = 2/3, F1 = 4/7.
    assert multilabel_micro_f1(gold, pred) == pytest.approx(4 / 7)
    assert multilabel_micro_f1([frozenset()], [frozenset()]) == 0.0


def test_score_source_re():
    inputs = ["s1", "s2", "s3", "s4"]
    golds = ["false", "CPR:3", "CPR:4", "false"]
    predictions = ["false", "The answer is CPR:3.", "gibberish", "CPR:4"]
    scores = score_source("re", inputs, golds, predictions, negative_label="false")
    # Positive predictions: CPR:3 (right), CPR:4 (wrong) -> P = 1/2; R = 1/2.
    assert scores == pytest.approx({"f1": 0.5, "accuracy": 0.5, "parse_rate": 0.5, "n": 4})
    assert set(scores) == {"f1", "accuracy", "parse_rate", "n"}


def test_score_source_nli_reports_accuracy_only():
    golds = ["entailment", "neutral", "contradiction"]
    predictions = ["Entailment", "neutral.", "entailment"]
    scores = score_source("nli", ["p"] * 3, golds, predictions)
    assert scores == pytest.approx({"accuracy": 1 / 3 * 2, "parse_rate": 2 / 3, "n": 3})


def test_score_source_cls_multilabel():
    labels = ["a b", "c", "d"]
    golds = ["a b, c", "none", "d"]
    predictions = ["c, a b", "none", "I think c"]
    scores = score_source("cls", ["t"] * 3, golds, predictions, label_space=labels)
    # tp = 2, predicted = 3, gold = 3 -> F1 = 2/3; exact sets: 2 of 3.
    assert scores == pytest.approx({"f1": 2 / 3, "accuracy": 2 / 3, "parse_rate": 2 / 3, "n": 3})
    # Without a label space the gold answers define it.
    assert score_source("cls", ["t"] * 3, golds, predictions) == scores


def test_score_source_qa_normalises_whitespace_and_case():
    golds = ["Yes", "the  answer"]
    predictions = [" yes\n", "  "]
    assert score_source("qa", ["q", "q"], golds, predictions) == pytest.approx(
        {"accuracy": 0.5, "parse_rate": 0.5, "n": 2}
    )


def test_score_source_ner_repaired_answers_score_but_do_not_parse():
    inputs = ["IL-2 binds : here"]
    golds = ["IL-2 : B-protein\nbinds : O\n: : O\nhere : O"]
    predictions = ["IL-2 : B-protein\n: : O\nhere : O"]
    scores = score_source("ner", inputs, golds, predictions)
    assert scores == pytest.approx(
        {"f1": 1.0, "precision": 1.0, "recall": 1.0, "parse_rate": 0.0, "n": 1}
    )


def test_score_source_rejects_bad_input():
    with pytest.raises(ValueError):
        score_source("ner", ["a"], ["a : O"], [])
    with pytest.raises(ValueError):
        score_source("summarise", ["a"], ["b"], ["b"])
    with pytest.raises(DataError):
        score_source("ner", ["a b"], ["a : O"], ["a : O"])
    with pytest.raises(DataError):
        score_source("re", ["s"], ["maybe"], ["x"], label_space=["yes", "no"])


def test_score_source_empty_source():
    assert score_source("re", [], [], []) == {"f1": 0.0, "accuracy": 0.0, "parse_rate": 0.0, "n": 0}


def test_checkpoint_score():
    results = {
        "ncbi": {"f1": 0.8, "precision": 0.7},
        "mednli": {"accuracy": 0.6, "parse_rate": 1.0},
        "some/source": {"f1": 0.1},
    }
    tasks = {"ncbi": "ner", "mednli": "nli", "some/source": "re"}
    assert checkpoint_score(results, tasks) == pytest.approx((0.8 + 0.6 + 0.1) / 3)
    assert checkpoint_score(results, tasks, "ncbi/precision") == 0.7
    assert checkpoint_score(results, tasks, "some/source/f1") == 0.1
    with pytest.raises(ValueError):
        checkpoint_score(results, tasks, "ncbi/accuracy")
    with pytest.raises(ValueError):
        checkpoint_score(results, {"ncbi": "ner"})
    with pytest.raises(ValueError):
        checkpoint_score({}, {})
    assert set(PRIMARY_METRIC) == {"ner", "re", "cls", "nli", "qa"}
