"""Benchmark the corpus build: records/s and peak memory for a large NER corpus.

Repeats the real NER sentences of ../shared/data/ner into three large iob files (written
to a temporary folder first, not timed), builds the corpus with a local 2-CPU Ray, and
writes the numbers as JSON:

    python benchmarks/prepare.py --out runs/bench/prepare.json --records 1000000

Memory is sampled every 0.25 s with psutil over the driver and all its descendant
processes (Ray's GCS, raylet and workers, which a local ``ray.init`` starts under the
driver): the peak of the summed RSS (counts the shared object store once per process
that maps it, so it overstates) and the peak of the summed USS (memory unique to each
process, the honest "how much does this take" number), plus the driver's own peak RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray

from bioray.config import from_dict
from bioray.corpus import build_corpus, read_manifest

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/ner"
SOURCES = {"ncbi_disease": ("NCBI-disease", "disease"), "bc5cdr_chem": ("BC5CDR-chem", "chemical"),
           "bc5cdr_disease": ("BC5CDR-disease", "disease")}


def _sentences(folder: Path) -> list[str]:
    text = "".join((folder / f).read_text(encoding="utf-8") for f in ("train.tsv", "devel.tsv"))
    return [s.strip("\n") + "\n\n" for s in text.split("\n\n") if s.strip()]


def write_repeated(out: Path, records: int) -> dict[str, Path]:
    """Writes one train file per source; together they hold exactly ``records`` sentences."""
    files = {}
    for k, (name, (folder, _)) in enumerate(SOURCES.items()):
        want = records // len(SOURCES) + (k < records % len(SOURCES))
        pool = _sentences(DATA / folder)
        path = out / f"{name}.tsv"
        with open(path, "w", encoding="utf-8") as f:
            for i in range(want):
                f.write(pool[i % len(pool)])
        files[name] = path
    return files


class MemorySampler(threading.Thread):
    """Peak summed RSS/USS of this process and its descendants, sampled in the background."""

    def __init__(self, every: float = 0.25):
        super().__init__(daemon=True)
        self.every, self.stop = every, threading.Event()
        self.peak_rss = self.peak_uss = self.peak_driver_rss = 0

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            rss = uss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, uss = rss + info.rss, uss + info.uss
            self.peak_rss, self.peak_uss = max(self.peak_rss, rss), max(self.peak_uss, uss)
            self.peak_driver_rss = max(self.peak_driver_rss, me.memory_info().rss)
            self.stop.wait(self.every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the results")
    ap.add_argument("--records", type=int, default=1_000_000, help="records the corpus holds")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"real NER data not found at {DATA}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="bioray-bench-"))
    try:
        (work / "src").mkdir()
        files = write_repeated(work / "src", args.records)
        cfg = from_dict({"run": {"dir": str(work / "run"), "quiet": True}, "corpus": {"sources": [
            {"name": n, "format": "iob", "task": "ner", "entity": SOURCES[n][1],
             "files": {"train": str(p)}} for n, p in files.items()]}})
        ray.init(num_cpus=2, include_dashboard=False)
        sampler = MemorySampler()
        sampler.start()
        started = time.perf_counter()
        corpus = build_corpus(cfg, force=True)
        seconds = time.perf_counter() - started
        sampler.stop.set()
        sampler.join()
        manifest = read_manifest(corpus)
        mib = 1 << 20
        result = {
            "records": manifest["total_records"],
            "seconds": round(seconds, 2),
            "records_per_s": round(manifest["total_records"] / seconds),
            "input_mib": round(sum(p.stat().st_size for p in files.values()) / mib, 1),
            "corpus_mib": round(sum(p.stat().st_size for p in corpus.glob("*.parquet")) / mib, 1),
            "shards": len(list(corpus.glob("*.parquet"))),
            "peak_rss_mib_driver_plus_ray": round(sampler.peak_rss / mib),
            "peak_uss_mib_driver_plus_ray": round(sampler.peak_uss / mib),
            "peak_rss_mib_driver": round(sampler.peak_driver_rss / mib),
            "memory_method": "psutil memory_full_info over the driver and its descendants, every 0.25 s",
            "logical_cpus": ray.cluster_resources().get("CPU"),
            "cores": psutil.cpu_count(),
        }
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
