"""Reading a built corpus (and the tokenised cache, laid out the same way): manifest, shards, row groups.

A corpus folder (``run.dir/corpus``, written by :mod:`bioray.corpus.build`) holds Parquet shards of
records with :data:`SCHEMA` and a ``manifest.json``. Training reads it through Ray Data, by
Parquet row groups (:func:`corpus_dataset`, :func:`read_row_groups`); scoring and the tiny base read
one source's split with plain pyarrow (:func:`read_records`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from bioray.errors import DataError

SCHEMA = pa.schema([(name, pa.string()) for name in
                    ("id", "task", "source", "split", "instruction", "input", "output")])
MANIFEST = "manifest.json"
# Logical CPUs per Ray Data read/filter/pack/write task (the corpus build, the tokenised cache's
# readers, mixing and packing): small, so they fit beside training workers and scorers on a
# 2-CPU cluster (Ray never oversubscribes logical CPUs; see FACTS.md).
LIGHT_CPUS = 0.25


def read_manifest(corpus_dir: str | Path) -> dict:
    """The corpus's ``manifest.json`` as a dict.

    Raises:
        DataError: the folder holds no manifest (not a built corpus), or one that is not valid JSON.
    """
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no corpus manifest (build the corpus with jobs/prepare.py)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sources"), dict):
        raise DataError(f"{path}: not a complete corpus manifest (cut short?); build the corpus again with "
                        f"jobs/prepare.py")
    return manifest


def shard_paths(corpus_dir: str | Path) -> list[str]:
    """The Parquet shards of a built corpus, sorted."""
    read_manifest(corpus_dir)  # fail clearly on a folder that is not a corpus
    return sorted(str(p) for p in Path(corpus_dir).glob("*.parquet"))


class RowGroupDatasource(Datasource):
    """Ray Data source over the corpus shards' Parquet row groups, one split only if asked.

    The planning happens in the driver from Parquet footers: row groups whose ``split``
    statistics exclude the split are never read, and consecutive row groups of a shard are
    grouped into read tasks of about ``rows_per_task`` rows. Unlike ``read_parquet`` there is
    no file-listing task (it asks a whole CPU, which a busy small cluster may not have), and a
    one-shard corpus still splits into many tasks.
    """

    def __init__(self, shards: list[str], split: Optional[str], columns: Optional[list[str]],
                 rows_per_task: Optional[int], schema: Optional[pa.Schema] = None):
        super().__init__()
        self._split = split
        self._columns = columns
        schema = schema or (pq.read_schema(shards[0]) if shards else SCHEMA)
        self._schema = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        self._units: list[tuple[str, list[int], int, int]] = []  # path, row groups, rows, bytes
        for path in shards:
            meta = pq.ParquetFile(path).metadata
            split_col = meta.schema.names.index("split") if split is not None else None
            group: list[int] = []
            rows = size = 0
            for i in range(meta.num_row_groups):
                rg = meta.row_group(i)
                if split_col is not None and not _may_hold(rg.column(split_col).statistics, split):
                    continue
                group.append(i)
                rows, size = rows + rg.num_rows, size + rg.total_byte_size
                if rows_per_task is not None and rows >= rows_per_task:
                    self._units.append((path, group, rows, size))
                    group, rows, size = [], 0, 0
            if group:
                self._units.append((path, group, rows, size))

    @property
    def num_tasks(self) -> int:
        return max(1, len(self._units))

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(u[3] for u in self._units) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context: Any = None) -> list[ReadTask]:
        if not self._units:  # keep a well-formed (empty) dataset
            meta = BlockMetadata(num_rows=0, size_bytes=0, input_files=[], exec_stats=None)
            return [ReadTask(lambda: [self._schema.empty_table()], meta, schema=self._schema)]
        tasks = []
        for path, groups, rows, size in self._units:
            fn = functools.partial(_read_row_groups, path, groups, self._split, self._columns)
            meta = BlockMetadata(num_rows=None if self._split else rows, size_bytes=size or None,
                                 input_files=[path], exec_stats=None)
            tasks.append(ReadTask(fn, meta, schema=self._schema, per_task_row_limit=per_task_row_limit))
        return tasks


def _may_hold(stats: Any, split: Optional[str]) -> bool:
    if split is None or stats is None or not stats.has_min_max:
        return True
    return stats.min <= split <= stats.max


def _read_row_groups(path: str, groups: list[int], split: Optional[str],
                     columns: Optional[list[str]]) -> Iterator[pa.Table]:
    read = None if columns is None else sorted(set(columns) | ({"split"} if split else set()))
    table = pq.ParquetFile(path).read_row_groups(groups, columns=read)
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    yield table if columns is None else table.select(columns)


def corpus_dataset(corpus_dir: str | Path, split: Optional[str] = None, columns: Optional[list[str]] = None,
                   num_cpus: float = LIGHT_CPUS, rows_per_block: Optional[int] = None,
                   ray_remote_args: Optional[dict] = None) -> "ray.data.Dataset":
    """The corpus as a Ray Dataset of records, optionally one split only.

    Args:
        corpus_dir: a folder written by :func:`build_corpus`.
        split: keep only this split (train/validation/test); None = all.
        columns: keep only these record columns; None = all.
        num_cpus: logical CPUs per read task. Give downstream tasks the same request and Ray
            Data fuses them into one task per block (no hand-over between processes).
        rows_per_block: about this many records per block (row groups are grouped up to it);
            None = one block per shard.
        ray_remote_args: more options for the read tasks (where they run: ``storage.file_task_options``).

    Returns:
        A lazy dataset with the record columns (row order is not the id order).
    """
    return read_row_groups(shard_paths(corpus_dir), split, columns, num_cpus, rows_per_block, schema=SCHEMA,
                           ray_remote_args=ray_remote_args)


def read_row_groups(paths: list[str], split: Optional[str] = None, columns: Optional[list[str]] = None,
                    num_cpus: float = LIGHT_CPUS, rows_per_block: Optional[int] = None,
                    schema: Optional[pa.Schema] = None, ray_remote_args: Optional[dict] = None) -> "ray.data.Dataset":
    """Parquet files as a Ray Dataset read by row groups (see :class:`RowGroupDatasource`).

    Used instead of ``ray.data.read_parquet`` where a whole-CPU file-listing task could wait
    forever: on a small cluster, and inside a Tune trial, where other trials hold the CPUs.
    """
    source = RowGroupDatasource(list(paths), split, columns, rows_per_block, schema=schema)
    # One block per read task: without override_num_blocks Ray Data splits small reads into
    # many blocks (and one task per block downstream).
    return ray.data.read_datasource(source, num_cpus=num_cpus, override_num_blocks=source.num_tasks,
                                    ray_remote_args=ray_remote_args)


def read_records(corpus_dir: str | Path, source: str, split: str,
                 limit: Optional[int] = None) -> list[dict]:
    """One source's split as record dicts sorted by id, read with pyarrow (no Ray).

    Args:
        corpus_dir: a folder written by :func:`build_corpus`.
        source: the source name.
        split: the split name.
        limit: keep the first ``limit`` records by id; None = all.
    """
    data = pads.dataset(shard_paths(corpus_dir), format="parquet", schema=SCHEMA)
    table = data.to_table(filter=(pads.field("source") == source) & (pads.field("split") == split))
    table = table.sort_by("id")
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()
