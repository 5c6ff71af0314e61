"""The corpus stage: source files -> instruction records -> Parquet shards + manifest."""

from bioray.corpus.build import (
    CORPUS_VERSION,
    build_corpus,
    content_hash,
    corpus_dataset,
    read_manifest,
    read_records,
)
from bioray.corpus.templates import instruction_set, render_prompt

__all__ = [
    "CORPUS_VERSION",
    "build_corpus",
    "content_hash",
    "corpus_dataset",
    "instruction_set",
    "read_manifest",
    "read_records",
    "render_prompt",
]
