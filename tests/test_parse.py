"""Parsers read any text without raising, and repair what a model commonly gets wrong."""

import random
import string

import pytest

from bioray.evaluate.parse import parse_label, parse_multilabel, parse_ner

TOKENS = ["BRCA1", "is", "secreted", ":", "IL-2:", "in", "cells"]
TAGS = ["B", "O", "O", "O", "B", "O", "O"]


def answer(tokens, tags):
    return "\n".join(f"{token} : {tag}" for token, tag in zip(tokens, tags))


def test_well_formed_answer_reads_back_exactly():
    parsed = parse_ner(answer(TOKENS, TAGS), TOKENS)
    assert parsed.well_formed
    assert parsed.tags == TAGS
    assert (parsed.missing, parsed.extra, parsed.malformed, parsed.reordered) == (0, 0, 0, 0)


@pytest.mark.parametrize("tail", ["\n", "\n\n", "  \n", "\r\n", "\n \n\t"])
def test_trailing_whitespace_and_empty_line_are_ignored(tail):
    parsed = parse_ner(answer(TOKENS, TAGS) + tail, TOKENS)
    assert parsed.well_formed and parsed.tags == TAGS


def test_crlf_line_endings_are_well_formed():
    text = answer(TOKENS, TAGS).replace("\n", "\r\n")
    assert parse_ner(text, TOKENS).well_formed


def test_colon_tokens_split_on_the_last_separator():
    tokens = [":", "a:b", ": :", "x"]
    tags = ["B", "I", "O", "O"]
    parsed = parse_ner(answer(tokens, tags), tokens)
    assert parsed.well_formed and parsed.tags == tags
    assert answer([":"], ["O"]) == ": : O"


def test_missing_line_gets_o_and_is_not_well_formed():
    lines = answer(TOKENS, TAGS).split("\n")
    del lines[1]
    parsed = parse_ner("\n".join(lines), TOKENS)
    assert not parsed.well_formed
    assert parsed.tags == TAGS
    assert parsed.missing == 1 and parsed.extra == 0


def test_missing_entity_line_falls_back_to_o():
    lines = answer(TOKENS, TAGS).split("\n")
    del lines[0]
    parsed = parse_ner("\n".join(lines), TOKENS)
    assert parsed.tags == ["O"] + TAGS[1:]
    assert parsed.missing == 1


def test_extra_lines_are_skipped():
    lines = answer(TOKENS, TAGS).split("\n")
    lines.insert(2, "hallucinated : B")
    lines.append("more : I")
    lines.insert(0, "Sure, here are the tags:")
    parsed = parse_ner("\n".join(lines), TOKENS)
    assert parsed.tags == TAGS and not parsed.well_formed
    assert parsed.extra == 3 and parsed.missing == 0


def test_duplicated_line_is_extra():
    lines = answer(TOKENS, TAGS).split("\n")
    lines.insert(1, lines[0])
    parsed = parse_ner("\n".join(lines), TOKENS)
    assert parsed.tags == TAGS and parsed.extra == 1


def test_reordered_lines_are_matched_by_text():
    tokens = ["a", "b", "c", "d"]
    tags = ["B", "I", "O", "B"]
    lines = answer(tokens, tags).split("\n")
    lines[0], lines[3] = lines[3], lines[0]
    parsed = parse_ner("\n".join(lines), tokens)
    assert parsed.tags == tags and not parsed.well_formed
    assert parsed.reordered >= 1 and parsed.missing == 0 and parsed.extra == 0


def test_repeated_tokens_keep_their_own_tags():
    tokens = ["the", "p53", "and", "the", "p21", "gene"]
    tags = ["O", "B", "O", "O", "B", "I"]
    lines = answer(tokens, tags).split("\n")
    del lines[2]
    parsed = parse_ner("\n".join(lines), tokens)
    assert parsed.tags == tags


@pytest.mark.parametrize(
    "line, tag",
    [
        ("is: B", "B"),  # lenient separator still read, but malformed
        ("is :B", "B"),
        ("is B", "B"),
        ("is", "O"),  # no tag at all
        ("is : X", "O"),  # invalid tag
        ("is : B-", "O"),
        ("is : b", "O"),
    ],
)
def test_malformed_line_is_repaired(line, tag):
    tokens = ["p53", "is", "here"]
    text = f"p53 : O\n{line}\nhere : O"
    parsed = parse_ner(text, tokens)
    assert parsed.tags == ["O", tag, "O"]
    assert not parsed.well_formed and parsed.malformed == 1


def test_misspelt_token_keeps_its_place():
    tokens = ["Na", "+", "channel"]
    parsed = parse_ner("Na : B\n+ : I\nchanel : I", tokens)
    assert parsed.tags == ["B", "I", "I"]
    assert not parsed.well_formed and parsed.malformed == 1


def test_token_mismatch_is_not_well_formed():
    assert not parse_ner("A : O", ["a"]).well_formed


def test_wrong_line_count_is_not_well_formed():
    assert not parse_ner(answer(TOKENS[:-1], TAGS[:-1]), TOKENS).well_formed


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "I cannot help with that.", "### Output:"])
def test_empty_and_garbage_answers_are_all_o(text):
    parsed = parse_ner(text, TOKENS)
    assert parsed.tags == ["O"] * len(TOKENS)
    assert not parsed.well_formed and parsed.missing == len(TOKENS)


def test_empty_sentence():
    assert parse_ner("", []).well_formed
    parsed = parse_ner("x : O", [])
    assert parsed.tags == [] and not parsed.well_formed and parsed.extra == 1


def test_typed_tags_checked_against_allowed_tags():
    allowed = {"O", "B-protein", "I-protein"}
    tokens = ["IL", "2", "binds"]
    good = answer(tokens, ["B-protein", "I-protein", "O"])
    assert parse_ner(good, tokens, allowed).well_formed
    bad = answer(tokens, ["B-protein", "I-gene", "O"])
    parsed = parse_ner(bad, tokens, allowed)
    assert parsed.tags == ["B-protein", "O", "O"] and not parsed.well_formed
    # Without allowed_tags any IOB2 type is accepted.
    assert parse_ner(bad, tokens).well_formed


def test_iob2_tags_without_allowed_tags():
    tokens = ["a", "b", "c"]
    assert parse_ner(answer(tokens, ["B-x", "I-x", "O"]), tokens).well_formed
    for tag in ["E-x", "S", "o", "B x", "-", "B-"]:
        assert not parse_ner(answer(tokens, [tag, "O", "O"]), tokens).well_formed


def test_random_text_never_crashes_and_length_is_kept():
    rng = random.Random(0)
    alphabet = string.printable + " : \n::" + "αβ\u2028"
    for _ in range(300):
        tokens = [
            "".join(rng.choices(alphabet[:62] + ":", k=rng.randint(1, 4)))
            for _ in range(rng.randint(0, 8))
        ]
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 120)))
        parsed = parse_ner(text, tokens)
        assert len(parsed.tags) == len(tokens)
        assert all(tag == "O" or tag[0] in "BI" for tag in parsed.tags)


def test_scrambled_answer_recovers_every_tag():
    rng = random.Random(1)
    tokens = [f"w{i}" for i in range(30)]
    tags = [rng.choice(["B", "I", "O"]) for _ in tokens]
    lines = answer(tokens, tags).split("\n")
    rng.shuffle(lines)
    parsed = parse_ner("\n".join(lines), tokens)
    assert parsed.tags == tags and parsed.missing == 0 and parsed.extra == 0


LABELS = ["CPR:3", "CPR:4", "false"]


@pytest.mark.parametrize(
    "text, label, well_formed",
    [
        ("CPR:3", "CPR:3", True),
        ("  cpr:4 \n", "CPR:4", True),
        ("False", "false", True),
        ("The relation is CPR:4.", "CPR:4", False),
        ("CPR:4 or maybe false", "CPR:4", False),
        ("false, not CPR:3", "false", False),
        ("falsehood", None, False),
        ("CPR:30", None, False),
        ("", None, False),
        ("no idea", None, False),
    ],
)
def test_parse_label(text, label, well_formed):
    parsed = parse_label(text, LABELS)
    assert (parsed.label, parsed.well_formed) == (label, well_formed)


def test_longest_label_wins_at_the_same_position():
    labels = ["DDI", "DDI-effect", "effect"]
    assert parse_label("DDI-effect is my answer", labels).label == "DDI-effect"
    assert parse_label("DDI effect", labels).label == "DDI"


def test_label_with_spaces_and_regex_characters():
    labels = ["no relation", "a+b (x)"]
    assert parse_label("I say: No Relation here", labels).label == "no relation"
    assert parse_label("a+b (x)", labels).well_formed


HOC = ["sustaining proliferative signaling", "evading growth suppressors", "invasion"]


def test_multilabel_well_formed():
    parsed = parse_multilabel("evading growth suppressors, Invasion", HOC, "none")
    assert parsed.well_formed
    assert parsed.labels == {"evading growth suppressors", "invasion"}
    none = parse_multilabel(" None\n", HOC, "none")
    assert none.well_formed and none.labels == frozenset()


@pytest.mark.parametrize(
    "text, labels",
    [
        ("invasion, invasion", {"invasion"}),  # duplicate
        ("invasion, unknown", {"invasion"}),
        ("invasion,", {"invasion"}),
        (
            "Labels: invasion; evading growth suppressors.",
            {"invasion", "evading growth suppressors"},
        ),
        ("none, invasion", {"invasion"}),
        ("nothing here", set()),
        ("", set()),
    ],
)
def test_multilabel_repaired(text, labels):
    parsed = parse_multilabel(text, HOC, "none")
    assert not parsed.well_formed
    assert parsed.labels == labels


def test_multilabel_label_inside_a_longer_label_is_not_counted():
    labels = ["activating invasion and metastasis", "invasion"]
    parsed = parse_multilabel("activating invasion and metastasis!", labels, "none")
    assert parsed.labels == {"activating invasion and metastasis"}
