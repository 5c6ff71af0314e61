"""Reading source files: one parser per format, and byte-range chunks for parallel reads.

A parser turns the lines of one byte range into :class:`Parsed` records and
:class:`Rejected` lines, in file order. Line numbers are 1-based and count every line
of the file (blank ones too), so a rejection can be found with ``sed -n Np``.
Parquet files, saved Hugging Face datasets (``instructions``/``messages`` files) and ``dataset:``
sources (any format, through ``datasets``) are read by row batches instead; their "line" is the
1-based row number. Rows of any layout go through the source's ``columns`` mapping first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple, Optional

from bioray.config import DATA_ENV, data_root
from bioray.config.validate import FORMAT_FIELDS
from bioray.corpus.templates import NLI_LABELS, instruction_set
from bioray.errors import DataError

if TYPE_CHECKING:
    from bioray.config import Config

# IOB2 tags: O, or B/I with an optional type (B-Disease, I-protein, B).
_TAG = re.compile(r"(?:([BI])(?:-(\S+))?|O)")
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TSV_SUFFIXES = (".tsv", ".txt")
# Most characters of a source's own text a rejection quotes: corpora may hold patient text, and
# rejected.jsonl and the error line are read by more people than the corpus.
QUOTE_CHARS = 80
# Formats whose files may also be Parquet or a saved Hugging Face dataset (rows, not lines).
ROW_FORMATS = ("instructions", "messages")
# Who says a turn of a chat record: OpenAI's roles and ShareGPT's `from` names.
ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant"}


class Parsed(NamedTuple):
    """An accepted record before ids and instructions are attached."""

    line: int
    input: str
    output: str
    labels: tuple[str, ...]  # answer words it uses (the manifest's label space)
    instruction: Optional[str] = None  # instructions format: the record's own


class Rejected(NamedTuple):
    """A line (or sentence, for iob: its first bad line) that did not make a record."""

    line: int
    reason: str


class Overlong(NamedTuple):
    """A line longer than ``corpus.max_line_bytes``: skipped unread, in place of its bytes."""

    size: int


def quote(value: Any) -> str:
    """``repr`` of a value from a source file, cut to :data:`QUOTE_CHARS` characters."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= QUOTE_CHARS:
        return repr(value)
    return f"{text[:QUOTE_CHARS]!r}... ({len(text)} characters)"


# ---------------------------------------------------------------- checks before the build


def check_sources(cfg: Config) -> None:
    """What a corpus build checks before it reads a line; the jobs call it before Ray starts.

    Raises:
        DataError: a source file is missing, a folder, unreadable or empty; a dataset does not load,
            or lacks a split or column the source names.
        ConfigError: a source's instructions cannot be made (a NER source without an entity).
    """
    check_files(cfg)
    for i, s in enumerate(cfg.corpus.sources):
        instruction_set(s, i)
        if s.dataset is not None:
            check_dataset(s, i)


def check_files(cfg: Config) -> None:
    """Checks every source file before the build starts: there, a file (or a saved dataset), not empty.

    Raises:
        DataError: naming the config key and the path.
    """
    root = data_root()
    for i, s in enumerate(cfg.corpus.sources):
        if s.dataset is not None and s.dataset.startswith((".", "/", "~")) and not Path(s.dataset).expanduser().exists():
            raise DataError(f"config key 'corpus.sources[{i}].dataset': folder not found: {s.dataset}")
        for split, path in s.files.items():
            key = f"config key 'corpus.sources[{i}].files.{split}'"
            p = Path(path)
            if not p.exists():
                # A path under the data root is most likely a public corpus not fetched yet.
                hint = f" (under {DATA_ENV}={root}: `bioray data fetch NAME` downloads the public corpora there)" \
                    if p.resolve().is_relative_to(root) else ""
                raise DataError(f"{key}: file not found: {path}{hint}")
            if p.is_dir():
                if s.format in ROW_FORMATS:
                    continue  # a saved Hugging Face dataset
                raise DataError(f"{key}: {path} is a folder; expected a {s.format} file")
            if not os.access(p, os.R_OK):
                raise DataError(f"{key}: {path} cannot be read (permission denied)")
            if p.stat().st_size == 0:
                raise DataError(f"{key}: {path} is empty")


# ---------------------------------------------------------------- layouts and chunks


def layout(fmt: str, path: Path) -> str:
    """How a source file is read: iob | jsonl | tsv | parquet | hf_dataset (a ``dataset:`` source: datasets).

    ``re_masked`` goes by suffix (.jsonl/.json/.ndjson or .tsv/.txt), else sniffs the
    first non-blank byte (``{`` means JSON lines).
    """
    if fmt == "iob":
        return "iob"
    if fmt in ROW_FORMATS:
        if path.is_dir():
            return "hf_dataset"
        return "parquet" if path.suffix == ".parquet" else "jsonl"
    if fmt != "re_masked" or path.suffix in _JSON_SUFFIXES:
        return "jsonl"
    if path.suffix in _TSV_SUFFIXES:
        return "tsv"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "jsonl" if head.startswith(b"{") else "tsv"


def splittable(lay: str) -> bool:
    """Whether a file of this layout can be cut into byte ranges."""
    return lay in ("iob", "jsonl", "tsv")


def boundary(path: Path, offset: int, lay: str) -> int:
    """The first record start at or after ``offset`` (the file size if there is none).

    Lines are records for jsonl/tsv. For iob the boundary is the start of a blank line:
    the sentence before it ends with its chunk, and the next chunk starts with a break.
    """
    if offset == 0:
        return 0
    with open(path, "rb") as f:
        # Back up one byte so an offset that already sits at a line start is kept.
        f.seek(offset - 1)
        pos = offset - 1 + len(f.readline())
        if lay != "iob":
            return pos
        for raw in f:
            if not raw.strip():
                return pos
            pos += len(raw)
        return pos


def iter_lines(path: Path, start: int, end: int, first_line: int,
               max_bytes: Optional[int] = None) -> Iterator[tuple[int, bytes | Overlong]]:
    """Yields ``(line number, raw bytes)`` for the lines that start in [start, end).

    A line longer than ``max_bytes`` is read past in pieces and yielded as :class:`Overlong`, so a
    file with one huge line (a missing line break, a binary file) never sits in memory whole.
    """
    piece = 1 << 20
    with open(path, "rb") as f:
        f.seek(start)
        pos, n = start, first_line
        while pos < end:
            raw = f.readline(max_bytes + 1) if max_bytes is not None else f.readline()
            if not raw:
                return
            size = len(raw)
            if max_bytes is not None and size > max_bytes:
                while not raw.endswith(b"\n") and raw:
                    raw = f.readline(piece)
                    size += len(raw)
                pos += size
                yield n, Overlong(size)
            else:
                pos += size
                yield n, raw
            n += 1


def _decode(n: int, raw: bytes | Overlong) -> str | Rejected:
    if isinstance(raw, Overlong):
        return Rejected(n, f"line is {raw.size} bytes, longer than corpus.max_line_bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejected(n, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
    if n == 1:
        text = text.lstrip("\ufeff")  # a UTF-8 byte-order mark is not part of the data
    return text.rstrip("\r\n")


# ---------------------------------------------------------------- iob


def parse_iob(lines: Iterable[tuple[int, bytes | Overlong]], typed: bool) -> Iterator[Parsed | Rejected]:
    """Sentences of ``token<TAB>tag`` lines; blank lines (any number) separate them.

    ``-DOCSTART-`` lines are dropped (they also end a sentence). A sentence with any bad
    line is rejected at its first bad line.
    """
    tokens: list[str] = []
    tags: list[str] = []
    first = 0
    bad: Optional[Rejected] = None
    for n, raw in lines:
        text = _decode(n, raw)
        if isinstance(text, str) and (not text.strip() or _is_docstart(text)):
            yield from _flush_sentence(first, tokens, tags, bad, typed)
            tokens, tags, bad = [], [], None
            continue
        if not tokens and bad is None:
            first = n
        if bad is None:
            bad = _iob_line(n, text, tokens, tags)
    yield from _flush_sentence(first, tokens, tags, bad, typed)


def _is_docstart(text: str) -> bool:
    return text.startswith("-DOCSTART-") and text[10:11] in ("", "\t", " ")


def _iob_line(n: int, text: str | Rejected, tokens: list[str], tags: list[str]) -> Optional[Rejected]:
    if isinstance(text, Rejected):
        return text
    cols = text.split("\t")
    if len(cols) != 2:
        return Rejected(n, f"expected 2 tab-separated columns (token, tag), got {len(cols)}")
    token, tag = cols
    if not token:
        return Rejected(n, "empty token")
    if token.split() != [token]:
        # The input joins tokens with spaces; a token holding whitespace would split apart.
        return Rejected(n, f"token {quote(token)} contains whitespace")
    if not _TAG.fullmatch(tag):
        return Rejected(n, f"tag {quote(tag)} is not IOB2 (expected O, B, I, B-TYPE or I-TYPE)")
    tokens.append(token)
    tags.append(tag)
    return None


def _flush_sentence(first: int, tokens: list[str], tags: list[str], bad: Optional[Rejected],
                    typed: bool) -> Iterator[Parsed | Rejected]:
    if bad is not None:
        yield bad
    elif tokens:
        out = repair_tags(tags, typed)
        answer = "\n".join(f"{t} : {g}" for t, g in zip(tokens, out))
        yield Parsed(first, " ".join(tokens), answer, tuple(sorted(set(out))))


def repair_tags(tags: list[str], typed: bool) -> list[str]:
    """IOB2 tags as seqeval reads them, types kept (typed) or dropped.

    An I that follows O, starts the sentence, or changes type opens an entity in seqeval,
    so it is written as B. Types are compared on the raw tags even when dropped, so two
    adjacent entities of different types stay two entities.
    """
    out = []
    prev: Optional[str] = None  # type of the entity the previous token is in; None = outside
    for tag in tags:
        if tag == "O":
            out.append("O")
            prev = None
            continue
        kind, kind_type = tag[0], tag[2:]
        if kind == "I" and prev != kind_type:
            kind = "B"
        out.append(f"{kind}-{kind_type}" if typed and kind_type else kind)
        prev = kind_type
    return out


# ---------------------------------------------------------------- line formats


def _label_text(value: Any) -> Optional[str]:
    # Labels match the map's keys by text: 0 and "0" both match the YAML key 0.
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    return None


def _label_map(labels: Optional[dict]) -> Optional[dict[str, str]]:
    return None if labels is None else {str(k): v for k, v in labels.items()}


def _text_lines(lines: Iterable[tuple[int, bytes | Overlong]]) -> Iterator[tuple[int, str | Rejected]]:
    """Yields ``(n, text)`` per non-blank line, or ``(n, Rejected)`` for bytes that are not UTF-8
    and lines longer than ``corpus.max_line_bytes``."""
    for n, raw in lines:
        text = _decode(n, raw)
        if isinstance(text, Rejected) or text.strip():
            yield n, text


def _json_lines(lines: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, Any]]:
    """Yields ``(n, dict)`` per non-blank line, or ``(n, Rejected)``."""
    for n, text in _text_lines(lines):
        if isinstance(text, Rejected):
            yield n, text
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield n, Rejected(n, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        yield n, obj if isinstance(obj, dict) else Rejected(n, "expected a JSON object")


def _tsv_lines(lines: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, Any]]:
    """Yields ``(n, {"sentence", "label"})`` per non-blank ``sentence<TAB>label`` line."""
    for n, text in _text_lines(lines):
        if isinstance(text, Rejected):
            yield n, text
            continue
        cols = text.split("\t")
        if len(cols) != 2:
            yield n, Rejected(n, f"expected 2 tab-separated columns (sentence, label), got {len(cols)}")
        elif n == 1 and cols == ["sentence", "label"]:
            continue  # a header row
        else:
            yield n, {"sentence": cols[0], "label": cols[1]}


def _text_field(obj: dict, key: str, n: int) -> str | Rejected:
    value = obj.get(key)
    if not isinstance(value, str):
        what = "missing" if value is None else f"not a string ({type(value).__name__})"
        return Rejected(n, f"field {key!r} is {what}")
    if not value.strip():
        return Rejected(n, f"field {key!r} is empty")
    return value


def parse_re(rows: Iterable[tuple[int, Any]], labels: Optional[dict]) -> Iterator[Parsed | Rejected]:
    """``{"sentence", "label"}`` rows; ``labels`` maps raw label text to answer words."""
    mapping = _label_map(labels)
    for n, obj in rows:
        if isinstance(obj, Rejected):
            yield obj
            continue
        sentence = _text_field(obj, "sentence", n)
        raw = _label_text(obj.get("label"))
        if isinstance(sentence, Rejected):
            yield sentence
        elif raw is None or not raw.strip():
            yield Rejected(n, "field 'label' is missing or not a string/number")
        elif mapping is not None and raw not in mapping:
            yield Rejected(n, f"label {quote(raw)} is not in the source's labels map {sorted(mapping)}")
        else:
            answer = mapping[raw] if mapping is not None else raw
            yield Parsed(n, sentence, answer, (answer,))


def parse_nli(rows: Iterable[tuple[int, Any]]) -> Iterator[Parsed | Rejected]:
    """MedNLI rows; input is ``Premise: ...\\nHypothesis: ...``, output the gold label."""
    for n, obj in rows:
        if isinstance(obj, Rejected):
            yield obj
            continue
        s1, s2 = _text_field(obj, "sentence1", n), _text_field(obj, "sentence2", n)
        gold = obj.get("gold_label")
        if isinstance(s1, Rejected) or isinstance(s2, Rejected):
            yield s1 if isinstance(s1, Rejected) else s2
        elif gold not in NLI_LABELS:
            # "-" marks pairs without annotator consensus (SNLI style): no gold answer.
            yield Rejected(n, f"gold_label {quote(gold)} is not one of {', '.join(NLI_LABELS)}")
        else:
            yield Parsed(n, f"Premise: {s1}\nHypothesis: {s2}", gold, (gold,))


def parse_multilabel(rows: Iterable[tuple[int, Any]], labels: Optional[dict],
                     none_label: str) -> Iterator[Parsed | Rejected]:
    """HoC rows ``{"text", "labels": [...]}``; output is the answer words joined by ", ".

    Order: first appearance among the map's answer words, or alphabetical without a map.
    """
    mapping = _label_map(labels)
    rank = {w: i for i, w in enumerate(dict.fromkeys(mapping.values()))} if mapping else None
    for n, obj in rows:
        if isinstance(obj, Rejected):
            yield obj
            continue
        text = _text_field(obj, "text", n)
        raw = obj.get("labels")
        if isinstance(text, Rejected):
            yield text
            continue
        if not isinstance(raw, list):
            yield Rejected(n, "field 'labels' is missing or not a list")
            continue
        words = _map_labels(n, raw, mapping)
        if isinstance(words, Rejected):
            yield words
            continue
        words = sorted(set(words), key=(lambda w: rank[w]) if rank else None)
        answer = ", ".join(words) if words else none_label
        yield Parsed(n, text, answer, tuple(words) or (none_label,))


def _map_labels(n: int, raw: list, mapping: Optional[dict[str, str]]) -> list[str] | Rejected:
    words = []
    for value in raw:
        label = _label_text(value)
        if label is None or not label.strip():
            return Rejected(n, f"label {quote(value)} is not a string or number")
        if mapping is not None and label not in mapping:
            return Rejected(n, f"label {quote(label)} is not in the source's labels map {sorted(mapping)}")
        words.append(mapping[label] if mapping is not None else label)
    return words


def parse_instructions(rows: Iterable[tuple[int, Any]]) -> Iterator[Parsed | Rejected]:
    """Published instruction records; an empty instruction gets one drawn from the set."""
    for n, obj in rows:
        if isinstance(obj, Rejected):
            yield obj
            continue
        missing = [k for k in ("instruction", "input", "output") if not isinstance(obj.get(k), str)]
        if missing:
            yield Rejected(n, f"field {missing[0]!r} is missing or not a string")
        elif not obj["output"].strip():
            yield Rejected(n, "field 'output' is empty")
        else:
            yield Parsed(n, obj["input"], obj["output"], (), obj["instruction"] or None)


def table_rows(path: Path, lay: str, batch_rows: int) -> Iterator[tuple[int, Any]]:
    """Yields ``(row number, dict)`` from a Parquet file or a saved HF dataset, in batches."""
    if lay == "parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
    else:
        import datasets

        # Memory-mapped Arrow: batches stream without loading the dataset.
        batches = datasets.load_from_disk(str(path)).with_format("arrow").iter(batch_size=batch_rows)
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield n, row


# ---------------------------------------------------------------- chat records and token rows


def parse_messages(rows: Iterable[tuple[int, Any]]) -> Iterator[Parsed | Rejected]:
    """Chat records: OpenAI ``{"messages": [{"role", "content"}]}`` or ShareGPT ``{"conversations": [{"from", "value"}]}``.

    The last turn is the assistant's answer (the output). System turns make the instruction (empty
    without one: nothing is drawn in its place); the user turn before the answer is the input, after
    any earlier turns, each a ``User: ...`` or ``Assistant: ...`` paragraph.
    """
    for n, obj in rows:
        if isinstance(obj, Rejected):
            yield obj
            continue
        turns = _turns(n, obj)
        if isinstance(turns, Rejected):
            yield turns
            continue
        roles = [role for role, _ in turns]
        if "assistant" not in roles:
            yield Rejected(n, "no assistant turn: nothing to take as the answer")
            continue
        if roles[-1] != "assistant":
            yield Rejected(n, f"a {roles[-1]} turn follows the last assistant turn (the answer must come last)")
            continue
        dialog = [(role, text) for role, text in turns[:-1] if role != "system"]
        if not dialog or dialog[-1][0] != "user":
            yield Rejected(n, "no user turn right before the answer")
        elif not turns[-1][1].strip():
            yield Rejected(n, "the answer (the last assistant turn) is empty")
        else:
            system = "\n\n".join(text for role, text in turns if role == "system")
            earlier = [f"{role.capitalize()}: {text}" for role, text in dialog[:-1]]
            text = "\n\n".join(earlier + [f"User: {dialog[-1][1]}"]) if earlier else dialog[-1][1]
            yield Parsed(n, text, turns[-1][1], (), system)


def _turns(n: int, obj: dict) -> list[tuple[str, str]] | Rejected:
    """A chat record's turns as ``(system|user|assistant, text)``."""
    key = "messages" if "messages" in obj or "conversations" not in obj else "conversations"
    raw = obj.get(key)
    if not isinstance(raw, list) or not raw:
        what = "missing" if raw is None else "not a non-empty list of turns"
        return Rejected(n, f"field {key!r} is {what}" + (" (or ShareGPT's 'conversations')" if raw is None else ""))
    turns = []
    for k, turn in enumerate(raw, 1):
        if not isinstance(turn, dict):
            return Rejected(n, f"turn {k} is not an object")
        role = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value"))
        if role not in ROLES:
            return Rejected(n, f"turn {k}: unknown role {quote(role)} (expected {', '.join(ROLES)})")
        if not isinstance(text, str):
            return Rejected(n, f"turn {k}: its text ('content' or 'value') is missing or not a string")
        turns.append((ROLES[role], text))
    return turns


def parse_iob_rows(rows: Iterable[tuple[int, Any]], typed: bool) -> Iterator[Parsed | Rejected]:
    """Sentences as rows ``{"tokens": [...], "tags": [...]}`` (IOB2 tag names, as Hugging Face NER datasets hold them)."""
    for n, obj in rows:
        if isinstance(obj, Rejected):
            yield obj
            continue
        tokens, tags = obj.get("tokens"), obj.get("tags")
        if not isinstance(tokens, list) or not isinstance(tags, list):
            yield Rejected(n, "fields 'tokens' and 'tags' must be lists")
        elif len(tokens) != len(tags) or not tokens:
            yield Rejected(n, f"{len(tokens)} tokens and {len(tags)} tags (expected the same number, at least one)")
        else:
            good: list[str] = []
            good_tags: list[str] = []
            bad = next((r for t, g in zip(tokens, tags) if (r := _iob_line(n, f"{t}\t{g}", good, good_tags))), None)
            yield from _flush_sentence(n, good, good_tags, bad, typed)


def _mapped(rows: Iterable[tuple[int, Any]], columns: Optional[dict[str, str]]) -> Iterator[tuple[int, Any]]:
    """Rows with each field read from its column (``source.columns``)."""
    for n, obj in rows:
        if columns and not isinstance(obj, Rejected):
            missing = next((c for c in columns.values() if c not in obj), None)
            obj = Rejected(n, f"column {missing!r} is missing") if missing is not None else \
                {**obj, **{field: obj[column] for field, column in columns.items()}}
        yield n, obj


# ---------------------------------------------------------------- datasets sources


def where(source: dict, split: str) -> str:
    """What a rejection or count names as a source split's file: its path, or ``DATASET[SPLIT]``."""
    if source["dataset"] is None:
        return source["files"][split]
    return f"{source['dataset']}[{source['splits'][split]}]"


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """``datasets``, imported on first use (the jobs' checks import it only for a dataset source), without
    its progress bars (a job's stderr holds one line per error)."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was:
            datasets.enable_progress_bars()


def _load(dataset: str, subset: Optional[str], split: Optional[str] = None) -> Any:
    """A ``datasets`` split (or, with no split, all of them as a dict-like of splits).

    A folder written by ``save_to_disk`` loads with ``load_from_disk`` (a single Dataset is split
    ``train``); anything else with ``load_dataset`` (a folder of data files, or a hub name).
    """
    path = Path(dataset).expanduser()
    with _quiet_datasets() as datasets:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.Dataset):
                data = datasets.DatasetDict({"train": data})
            return data if split is None else data[split]
        return datasets.load_dataset(str(path) if path.exists() else dataset, subset, split=split)


def _required(fmt: str, columns: Optional[dict[str, str]]) -> dict[str, str]:
    """Field -> column that every row of a dataset must have (an instructions dataset may lack instructions)."""
    fields = [f for f in FORMAT_FIELDS[fmt] if not (fmt == "instructions" and f == "instruction")]
    return {f: (columns or {}).get(f, f) for f in fields}


def check_dataset(s: Any, index: int) -> None:
    """Loads a ``dataset:`` source and checks the splits and columns it names.

    Raises:
        DataError: naming the config key: the dataset does not load, has no such split, or its split
            lacks a column the format needs.
    """
    key = f"config key 'corpus.sources[{index}]"
    try:
        data = _load(s.dataset, s.subset)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{key}.dataset': cannot load {s.dataset!r}: {first}") from None
    for split, name in s.splits.items():
        if name not in data:
            raise DataError(f"{key}.splits.{split}': {s.dataset} has no split {name!r} (it has: "
                            f"{', '.join(sorted(data))})")
        have = data[name].column_names
        for field, column in _required(s.format, s.columns).items():
            if s.format == "messages" and field == "messages" and not s.columns and "conversations" in have:
                continue  # ShareGPT's name for it
            if column not in have:
                raise DataError(f"{key}.columns': {s.dataset}[{name}] has no column {column!r} for field {field!r} "
                                f"of format {s.format} (its columns: {', '.join(have)}); map one in columns")


def dataset_fingerprint(s: Any) -> list[str]:
    """``datasets``' fingerprints of a hub dataset's splits (a local one is hashed by its files)."""
    data = _load(s.dataset, s.subset)
    return [data[name]._fingerprint for _, name in sorted(s.splits.items())]


def dataset_rows(source: dict, split: str, dataset: str, batch_rows: int) -> Iterator[tuple[int, Any]]:
    """Yields ``(row number, dict)`` of one split of a ``dataset:`` source, in batches.

    Class-label tags (Hugging Face NER datasets store tag ids) become their names; an instructions
    dataset without an instruction column gives every record an empty one (one is drawn).
    """
    data = _load(dataset, source["subset"], source["splits"][split])
    columns = source["columns"] or {}
    tags = columns.get("tags", "tags")
    names = getattr(getattr(data.features.get(tags), "feature", None), "names", None) \
        if source["format"] == "iob" else None
    instruction = columns.get("instruction", "instruction")
    fill = source["format"] == "instructions" and instruction not in data.column_names
    n = 0
    for batch in data.with_format("arrow").iter(batch_size=batch_rows):
        for row in batch.to_pylist():
            n += 1
            if names is not None and isinstance(row.get(tags), list):
                row[tags] = [names[t] if isinstance(t, int) and 0 <= t < len(names) else t for t in row[tags]]
            if fill:
                row[instruction] = ""
            yield n, row


# ---------------------------------------------------------------- dispatch


def parse(fmt: str, lay: str, source: dict, rows_or_lines: Iterable) -> Iterator[Parsed | Rejected]:
    """Parses lines (iob/jsonl/tsv layouts) or table rows with the source's format.

    Args:
        fmt: the source's format.
        lay: the file's layout (:func:`layout`).
        source: the source's config as a plain dict (it crosses to Ray tasks).
        rows_or_lines: ``(line, raw bytes)`` pairs, or ``(row, dict)`` for tables and datasets.
    """
    if fmt == "iob" and lay == "iob":
        return parse_iob(rows_or_lines, source["typed"])
    if lay == "jsonl":
        rows = _json_lines(rows_or_lines)
    elif lay == "tsv":
        rows = _tsv_lines(rows_or_lines)
    else:
        rows = rows_or_lines
    rows = _mapped(rows, source["columns"])
    if fmt == "iob":
        return parse_iob_rows(rows, source["typed"])
    if fmt == "messages":
        return parse_messages(rows)
    if fmt == "re_masked":
        return parse_re(rows, source["labels"])
    if fmt == "nli":
        return parse_nli(rows)
    if fmt == "multilabel":
        return parse_multilabel(rows, source["labels"], source["none_label"])
    return parse_instructions(rows)
