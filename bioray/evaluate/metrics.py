"""Score parsed answers: the metrics of `eval.json`, one dict per source.

Pure Python on purpose: scorer actors and tests import this without torch, and NER scores must
equal seqeval's without making seqeval a runtime dependency (tests check equality on real data).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from bioray.errors import DataError
from bioray.evaluate.parse import parse_label, parse_multilabel, parse_ner

PRIMARY_METRIC = {"ner": "f1", "re": "f1", "cls": "f1", "nli": "accuracy", "qa": "accuracy"}
"""The metric that ranks checkpoints for each task."""


def entity_prf(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1, identical to seqeval's default mode.

    That is `seqeval.metrics.{precision,recall,f1}_score(gold, pred)`: conlleval-style chunks
    (an I- after O starts an entity, a change of type starts a new one, untyped B/I/E/S are
    allowed), with 0.0 wherever a ratio would divide by zero.

    Args:
        gold: Reference tags, one list per sentence.
        pred: Predicted tags, the same shape as `gold`.

    Returns:
        {"precision", "recall", "f1"}.

    Raises:
        ValueError: The sentence counts or lengths differ.
    """
    if [len(s) for s in gold] != [len(s) for s in pred]:
        raise ValueError("gold and pred must have the same number of sentences and tokens")
    true_entities = set(_entities(gold))
    pred_entities = set(_entities(pred))
    correct = len(true_entities & pred_entities)
    precision = _ratio(correct, len(pred_entities))
    recall = _ratio(correct, len(true_entities))
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}


def _entities(sentences: list[list[str]]) -> list[tuple[str, int, int]]:
    """(type, first, last) chunks, exactly as `seqeval.metrics.sequence_labeling.get_entities`."""
    # seqeval joins sentences with an 'O' between them and scans once; offsets and the state
    # carried across that 'O' are reproduced, so even odd tags chunk as seqeval chunks them.
    seq = [tag for sentence in sentences for tag in [*sentence, "O"]]
    prev_tag, prev_type, begin = "O", "", 0
    chunks = []
    for i, chunk in enumerate([*seq, "O"]):
        tag = chunk[:1]
        type_ = chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    # Same operation order as seqeval/sklearn, so results agree to the last bit.
    denominator = precision + recall
    return 2 * precision * recall / denominator if denominator else 0.0


def micro_f1(gold: list[str], pred: list[str | None], negative_label: str | None) -> float:
    """Micro-F1 over the classes other than `negative_label` (the BLUE/BLURB RE metric).

    Precision is correct non-negative predictions over non-negative predictions, recall is
    correct non-negative predictions over non-negative gold labels. A None prediction
    (unparsable) is wrong and predicts no class. Without a negative label and with every
    prediction parsed this equals accuracy.

    Args:
        gold: Reference labels.
        pred: Predicted labels, None where the answer named none.
        negative_label: The "no relation" label left out, or None to keep every class.

    Returns:
        The F1, 0.0 where undefined.
    """
    _check_lengths(gold, pred)
    predicted = sum(1 for p in pred if p is not None and p != negative_label)
    relevant = sum(1 for g in gold if g != negative_label)
    correct = sum(1 for g, p in zip(gold, pred) if g == p and g != negative_label)
    return _f1(_ratio(correct, predicted), _ratio(correct, relevant))


def accuracy(gold: Sequence[object], pred: Sequence[object]) -> float:
    """Share of predictions equal to the reference (0.0 for no examples).

    Args:
        gold: Reference values.
        pred: Predicted values (None never equals a reference).

    Returns:
        The accuracy.
    """
    _check_lengths(gold, pred)
    return _ratio(sum(1 for g, p in zip(gold, pred) if g == p), len(gold))


def multilabel_micro_f1(gold: list[frozenset[str]], pred: list[frozenset[str]]) -> float:
    """Micro-F1 over (example, label) memberships, as for HoC.

    Args:
        gold: Reference label sets (empty for the none answer).
        pred: Predicted label sets.

    Returns:
        The F1, 0.0 where undefined.
    """
    _check_lengths(gold, pred)
    correct = sum(len(g & p) for g, p in zip(gold, pred))
    precision = _ratio(correct, sum(len(p) for p in pred))
    recall = _ratio(correct, sum(len(g) for g in gold))
    return _f1(precision, recall)


def _check_lengths(gold: Sequence[object], pred: Sequence[object]) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold answers but {len(pred)} predictions")


def score_source(
    task: str,
    inputs: list[str],
    golds: list[str],
    predictions: list[str],
    label_space: Sequence[str] | None = None,
    negative_label: str | None = None,
    none_label: str = "none",
    allowed_tags: Collection[str] | None = None,
) -> dict[str, float]:
    """Scores one source's predictions: the metrics `eval.json` reports for it.

    Args:
        task: ner, re, nli, cls or qa.
        inputs: The records' inputs (NER tokens are `input.split(" ")`).
        golds: The records' reference answers, well-formed.
        predictions: Generated answers, free text.
        label_space: Labels for re, nli and cls; None takes those the gold answers use.
        negative_label: The label RE/cls `f1` leaves out, if any.
        none_label: The cls answer that means "no label".
        allowed_tags: Valid NER tags; None accepts any IOB2 tag.

    Returns:
        ner: f1, precision, recall, parse_rate, n; re and cls: f1, accuracy, parse_rate, n;
        nli and qa: accuracy, parse_rate, n. `n` is an int, the rest fractions in [0, 1].

    Raises:
        ValueError: Unknown task, or inputs, golds and predictions differ in length.
        DataError: A gold answer does not parse (the corpus and the scorer disagree).
    """
    if not len(inputs) == len(golds) == len(predictions):
        raise ValueError(
            f"{len(inputs)} inputs, {len(golds)} gold answers, {len(predictions)} predictions"
        )
    if task == "ner":
        return _score_ner(inputs, golds, predictions, allowed_tags)
    if task in ("re", "nli"):
        labels = sorted(set(golds)) if label_space is None else label_space
        scores = _score_labels(golds, predictions, labels, negative_label)
        return scores if task == "re" else _without(scores, "f1")
    if task == "cls":
        return _score_multilabel(golds, predictions, label_space, negative_label, none_label)
    if task == "qa":
        return _score_qa(golds, predictions)
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(PRIMARY_METRIC)}")


def _score_ner(
    inputs: list[str],
    golds: list[str],
    predictions: list[str],
    allowed_tags: Collection[str] | None,
) -> dict[str, float]:
    gold_tags, pred_tags, parsed = [], [], []
    for index, (text, gold, prediction) in enumerate(zip(inputs, golds, predictions)):
        tokens = text.split(" ")
        gold_parse = parse_ner(gold, tokens, allowed_tags)
        if not gold_parse.well_formed:
            raise DataError(f"NER gold answer {index} is not one `token : TAG` line per token")
        pred_parse = parse_ner(prediction, tokens, allowed_tags)
        gold_tags.append(gold_parse.tags)
        pred_tags.append(pred_parse.tags)
        parsed.append(pred_parse.well_formed)
    return {**entity_prf(gold_tags, pred_tags), **_rate_and_n(parsed)}


def _score_labels(
    golds: list[str],
    predictions: list[str],
    labels: Sequence[str],
    negative_label: str | None,
) -> dict[str, float]:
    gold_labels = [_gold_label(index, gold, labels) for index, gold in enumerate(golds)]
    parses = [parse_label(prediction, labels) for prediction in predictions]
    pred_labels = [p.label for p in parses]
    return {
        "f1": micro_f1(gold_labels, pred_labels, negative_label),
        "accuracy": accuracy(gold_labels, pred_labels),
        **_rate_and_n([p.well_formed for p in parses]),
    }


def _gold_label(index: int, gold: str, labels: Sequence[str]) -> str:
    parsed = parse_label(gold, labels)
    if not parsed.well_formed:
        raise DataError(f"gold answer {index} {gold!r} is not one of the labels {list(labels)}")
    return parsed.label


def _score_multilabel(
    golds: list[str],
    predictions: list[str],
    label_space: Sequence[str] | None,
    negative_label: str | None,
    none_label: str,
) -> dict[str, float]:
    labels = _gold_label_space(golds, none_label) if label_space is None else label_space
    gold_sets = []
    for index, gold in enumerate(golds):
        parsed = parse_multilabel(gold, labels, none_label)
        if not parsed.well_formed:
            raise DataError(f"gold answer {index} {gold!r} is not a list of known labels")
        gold_sets.append(parsed.labels)
    parses = [parse_multilabel(prediction, labels, none_label) for prediction in predictions]
    pred_sets = [p.labels for p in parses]
    # The negative label, if a classification source names one, is left out of f1 only.
    drop = frozenset([negative_label]) if negative_label is not None else frozenset()
    return {
        "f1": multilabel_micro_f1([g - drop for g in gold_sets], [p - drop for p in pred_sets]),
        "accuracy": accuracy(gold_sets, pred_sets),
        **_rate_and_n([p.well_formed for p in parses]),
    }


def _gold_label_space(golds: list[str], none_label: str) -> list[str]:
    items = {item.strip() for gold in golds for item in gold.split(",")}
    return sorted(item for item in items if item and item.casefold() != none_label.casefold())


def _score_qa(golds: list[str], predictions: list[str]) -> dict[str, float]:
    gold_norm = [_normalise(gold) for gold in golds]
    pred_norm = [_normalise(prediction) for prediction in predictions]
    return {
        "accuracy": accuracy(gold_norm, pred_norm),
        **_rate_and_n([bool(p) for p in pred_norm]),
    }


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _rate_and_n(parsed: list[bool]) -> dict[str, float]:
    return {"parse_rate": _ratio(sum(parsed), len(parsed)), "n": len(parsed)}


def _without(scores: dict[str, float], key: str) -> dict[str, float]:
    return {k: v for k, v in scores.items() if k != key}


def checkpoint_score(
    eval_results: dict[str, dict[str, float]], tasks: dict[str, str], score: str = "mean"
) -> float:
    """One number to rank checkpoints (and Tune trials) by.

    Args:
        eval_results: {source: {metric: value}}, the `eval` of `eval.json`.
        tasks: {source: task} for the sources in `eval_results`.
        score: "mean" averages each source's primary metric (PRIMARY_METRIC); "SOURCE/METRIC"
            picks one value.

    Returns:
        The score.

    Raises:
        ValueError: `score` names a source or metric that is not there, a source has no task,
            or there are no results to average.
    """
    if score == "mean":
        if not eval_results:
            raise ValueError("no evaluation results to average")
        return sum(_primary(source, eval_results, tasks) for source in eval_results) / len(
            eval_results
        )
    source, sep, metric = score.rpartition("/")
    if not sep or metric not in eval_results.get(source, {}):
        raise ValueError(
            f"score {score!r} must be 'mean' or SOURCE/METRIC with a source among "
            f"{sorted(eval_results)} and one of its metrics"
        )
    return float(eval_results[source][metric])


def _primary(
    source: str, eval_results: dict[str, dict[str, float]], tasks: dict[str, str]
) -> float:
    task = tasks.get(source)
    if task not in PRIMARY_METRIC:
        raise ValueError(f"source {source!r} has no known task (got {task!r})")
    return float(eval_results[source][PRIMARY_METRIC[task]])
