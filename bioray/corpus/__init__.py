"""The corpus stage: source files -> instruction records -> Parquet shards + manifest.

``build`` writes a corpus, ``read`` reads one back, ``templates`` holds the instructions and the
prompt layout (rendered and encoded the same way for training and for scoring).
"""

from bioray.corpus.build import CORPUS_VERSION, build_corpus, content_hash
from bioray.corpus.read import corpus_dataset, read_manifest, read_records, read_row_groups
from bioray.corpus.templates import encode_prompt, instruction_set, render_prompt

__all__ = [
    "CORPUS_VERSION",
    "build_corpus",
    "content_hash",
    "corpus_dataset",
    "encode_prompt",
    "instruction_set",
    "read_manifest",
    "read_records",
    "read_row_groups",
    "render_prompt",
]
