"""Turn generated answers back into tags and labels.

Answers are free text, so every parser here accepts any string without raising. Each one says
whether the answer was well-formed as generated (that feeds `parse_rate`) and, when it was not,
repairs what it can so the answer is still scored.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Collection, Sequence

NER_SEPARATOR = " : "
"""Between the token and its tag on each NER answer line (`token : TAG`)."""

_IOB2_TAG = re.compile(r"O|[BI](-\S+)?")


@dataclasses.dataclass(frozen=True)
class NerParse:
    """One NER answer read back as one tag per input token."""

    tags: list[str]
    """Exactly one tag per input token; tokens the answer did not tag get 'O'."""
    well_formed: bool
    """The answer was one `token : TAG` line per input token, in order, with valid tags."""
    missing: int = 0
    """Input tokens that no answer line was matched to."""
    extra: int = 0
    """Answer lines that were matched to no input token (blank lines included)."""
    malformed: int = 0
    """Lines that were not `token : TAG`, had an invalid tag or named another token."""
    reordered: int = 0
    """Lines matched to their token out of order."""


@dataclasses.dataclass(frozen=True)
class LabelParse:
    """One single-label answer (RE, NLI) read back."""

    label: str | None
    """The label as spelled in the label space, or None when no label was found."""
    well_formed: bool
    """The stripped answer is exactly one label (case-insensitive)."""


@dataclasses.dataclass(frozen=True)
class MultiParse:
    """One multi-label answer (HoC) read back."""

    labels: frozenset[str]
    """Labels as spelled in the label space; empty for the none word."""
    well_formed: bool
    """Comma-separated known labels without duplicates, or exactly the none word."""


@dataclasses.dataclass
class _Line:
    text: str
    tag: str | None
    clean: bool  # split on NER_SEPARATOR, as opposed to a lenient fallback


def parse_ner(
    answer: str, tokens: list[str], allowed_tags: Collection[str] | None = None
) -> NerParse:
    """Reads an NER answer back as one tag per input token.

    Args:
        answer: Generated text, expected to hold one `token : TAG` line per token.
        tokens: The input tokens, in order.
        allowed_tags: Valid tags; None accepts any IOB2 tag (`O`, `B`, `I-protein`, ...).

    Returns:
        The tags (invalid or missing ones read as 'O'), whether the answer was well-formed,
        and counters describing what had to be repaired.
    """
    lines = _answer_lines(answer)
    if _is_well_formed(lines, tokens, allowed_tags):
        tags = [line.rsplit(NER_SEPARATOR, 1)[1] for line in lines]
        return NerParse(tags=tags, well_formed=True)
    return _repair_ner(lines, tokens, allowed_tags)


def _answer_lines(answer: str) -> list[str]:
    # Trailing whitespace is where an EOS-ish empty line or a stray newline ends up.
    text = answer.rstrip()
    if not text:
        return []
    return [line.removesuffix("\r") for line in text.split("\n")]


def _valid_tag(tag: str, allowed_tags: Collection[str] | None) -> bool:
    if allowed_tags is not None:
        return tag in allowed_tags
    return _IOB2_TAG.fullmatch(tag) is not None


def _is_well_formed(
    lines: list[str], tokens: list[str], allowed_tags: Collection[str] | None
) -> bool:
    if len(lines) != len(tokens):
        return False
    for line, token in zip(lines, tokens):
        # Split on the last separator: the token ':' gives the line ': : O'.
        text, sep, tag = line.rpartition(NER_SEPARATOR)
        if not sep or text != token or not _valid_tag(tag, allowed_tags):
            return False
    return True


def _split_line(line: str) -> _Line:
    text, sep, tag = line.rpartition(NER_SEPARATOR)
    if sep:
        return _Line(text, tag.strip(), clean=True)
    # Lenient fallbacks for near misses such as 'token: O', 'token :O' or 'token O'.
    text, sep, tag = line.rpartition(":")
    if sep and text.strip():
        return _Line(text, tag.strip(), clean=False)
    parts = line.rsplit(None, 1)
    if len(parts) == 2:
        return _Line(parts[0], parts[1], clean=False)
    return _Line(line, None, clean=False)


def _key(text: str) -> str:
    # Matching ignores surrounding whitespace; well-formedness was already checked exactly.
    return text.strip()


def _repair_ner(
    raw_lines: list[str], tokens: list[str], allowed_tags: Collection[str] | None
) -> NerParse:
    blank = sum(1 for line in raw_lines if not line.strip())
    lines = [_split_line(line) for line in raw_lines if line.strip()]
    line_of_token: dict[int, int] = {}
    gaps = _align_in_order(lines, tokens, line_of_token)
    reordered = _match_reordered(lines, tokens, line_of_token)
    substituted = _pair_gaps(gaps, line_of_token)

    tags = ["O"] * len(tokens)
    for token_index, line_index in line_of_token.items():
        tag = lines[line_index].tag
        if tag is not None and _valid_tag(tag, allowed_tags):
            tags[token_index] = tag
    malformed = substituted + sum(
        1
        for line in lines
        if not line.clean or line.tag is None or not _valid_tag(line.tag, allowed_tags)
    )
    return NerParse(
        tags=tags,
        well_formed=False,
        missing=len(tokens) - len(line_of_token),
        extra=len(lines) - len(line_of_token) + blank,
        malformed=malformed,
        reordered=reordered,
    )


def _align_in_order(
    lines: list[_Line], tokens: list[str], line_of_token: dict[int, int]
) -> list[tuple[int, int, int, int]]:
    """Matches lines to tokens in order by text.

    Returns:
        The gaps left between matches that hold both lines and tokens, as
        (first line, end line, first token, end token).
    """
    matcher = difflib.SequenceMatcher(
        None,
        [_key(line.text) for line in lines],
        [_key(token) for token in tokens],
        # autojunk would ignore frequent tokens ('the', ',') in long sentences.
        autojunk=False,
    )
    gaps = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            line_of_token.update(zip(range(j1, j2), range(i1, i2)))
        elif op == "replace":
            gaps.append((i1, i2, j1, j2))
    return gaps


def _match_reordered(lines: list[_Line], tokens: list[str], line_of_token: dict[int, int]) -> int:
    """Matches leftover lines to leftover tokens with the same text, wherever they are."""
    free_tokens: dict[str, list[int]] = {}
    for j, token in enumerate(tokens):
        if j not in line_of_token:
            free_tokens.setdefault(_key(token), []).append(j)
    used = set(line_of_token.values())
    reordered = 0
    for i, line in enumerate(lines):
        candidates = free_tokens.get(_key(line.text))
        if i in used or not candidates:
            continue
        line_of_token[candidates.pop(0)] = i
        reordered += 1
    return reordered


def _pair_gaps(gaps: list[tuple[int, int, int, int]], line_of_token: dict[int, int]) -> int:
    """Pairs lines and tokens still free in a gap by position when their counts agree.

    That keeps a misspelt token (`Na+` for `Na +`) in place instead of dropping its tag.
    """
    used = set(line_of_token.values())
    paired = 0
    for i1, i2, j1, j2 in gaps:
        free_lines = [i for i in range(i1, i2) if i not in used]
        free_tokens = [j for j in range(j1, j2) if j not in line_of_token]
        if free_lines and len(free_lines) == len(free_tokens):
            line_of_token.update(zip(free_tokens, free_lines))
            paired += len(free_lines)
    return paired


def parse_label(answer: str, labels: Sequence[str]) -> LabelParse:
    """Reads a single-label answer (RE, NLI).

    Args:
        answer: Generated text.
        labels: The label space.

    Returns:
        The label found earliest in the answer as a whole word (case-insensitive; the longest
        label wins when several start at the same place), or None when there is none.
    """
    by_fold = _fold_map(labels)
    stripped = answer.strip().casefold()
    if stripped in by_fold:
        return LabelParse(label=by_fold[stripped], well_formed=True)
    best: tuple[int, int] | None = None
    found = None
    for label, pattern in _label_patterns(tuple(by_fold.values())):
        match = pattern.search(answer)
        if match is None:
            continue
        rank = (match.start(), -len(label))
        if best is None or rank < best:
            best, found = rank, label
    return LabelParse(label=found, well_formed=False)


def _fold_map(labels: Sequence[str]) -> dict[str, str]:
    # The first spelling of a label wins when two differ only in case.
    by_fold: dict[str, str] = {}
    for label in labels:
        if label.strip():
            by_fold.setdefault(label.strip().casefold(), label)
    return by_fold


@functools.lru_cache(maxsize=64)
def _label_patterns(labels: tuple[str, ...]) -> list[tuple[str, re.Pattern[str]]]:
    # Lookarounds instead of \b: labels may start or end with punctuation ('CPR:3', 'DDI-int').
    return [
        (label, re.compile(rf"(?<!\w){re.escape(label.strip())}(?!\w)", re.IGNORECASE))
        for label in labels
    ]


def parse_multilabel(answer: str, labels: Sequence[str], none_label: str) -> MultiParse:
    """Reads a multi-label answer (HoC): a comma-separated label list, or the none word.

    Args:
        answer: Generated text.
        labels: The label space; the none word is not a label.
        none_label: The answer that means "no label".

    Returns:
        The labels named; a malformed answer yields every known label it mentions as a whole
        word (a label inside a longer label that was found does not count).
    """
    by_fold = _fold_map([label for label in labels if label.strip() != none_label.strip()])
    stripped = answer.strip()
    if stripped.casefold() == none_label.strip().casefold():
        return MultiParse(labels=frozenset(), well_formed=True)
    items = [item.strip().casefold() for item in stripped.split(",")]
    if all(item in by_fold for item in items) and len(set(items)) == len(items):
        return MultiParse(labels=frozenset(by_fold[item] for item in items), well_formed=True)
    return MultiParse(labels=_mentioned_labels(answer, by_fold), well_formed=False)


def _mentioned_labels(answer: str, by_fold: dict[str, str]) -> frozenset[str]:
    longest_first = tuple(sorted(by_fold.values(), key=len, reverse=True))
    taken = [False] * len(answer)
    found = set()
    for label, pattern in _label_patterns(longest_first):
        for match in pattern.finditer(answer):
            if not any(taken[match.start() : match.end()]):
                taken[match.start() : match.end()] = [True] * (match.end() - match.start())
                found.add(label)
    return frozenset(found)
