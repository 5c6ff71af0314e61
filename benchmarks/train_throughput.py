"""Benchmark training throughput: bioray on Ray Train against transformers' Trainer under torchrun.

The same LoRA job, on the same cores one after the other, in one run:

    python benchmarks/train_throughput.py --out runs/bench/train_throughput.json

- ``reference``: transformers' ``Trainer`` + peft LoRA launched with ``torchrun --nproc_per_node 2``
  (the path Axolotl and LLaMA-Factory take), padded batches (``DataCollatorForSeq2Seq``: pad to the
  longest in the batch, labels -100 on the prompt and the padding), no packing;
- ``bioray``: ``bioray.train.fit`` on ``bioray.data.training_dataset``, a 2-CPU Ray with 2 workers
  of 1 CPU each, packing on (bioray's default);
- ``bioray_unpacked``: the same with packing off.

The job is the same on every row: a Llama-architecture model (hidden 256, 4 layers, 8 heads,
intermediate 688, untied embeddings, an 8,000-token byte-level BPE trained on the records' text),
initialised once from one seed and saved as a Hugging Face folder that every row loads; the real
NER training records of ../shared/data/ner in the paper's layout, loss on the answer only, max
length 256 with overlong records dropped; micro-batch 8 per process, 2 processes, LoRA r=16,
alpha 32, dropout 0 on q/k/v/o, fp32, one torch thread per process, gradients all-reduced over
gloo: plain DDP on the reference's side, DeepSpeed ZeRO stage 0 (its plain data parallel) on
bioray's (``--zero-stage 2`` for bioray's default). Not DeepSpeed on both: under torchrun on CPU,
accelerate (1.15) gives a DeepSpeed run no backend and counts one process, so each rank reads the
same batches while DeepSpeed still averages gradients over two: not the same job.

Both sides read the same token ids: the reference reads exactly the rows bioray's unpacked run
reads (its mixed, shuffled epoch split per rank as ``fit`` splits it), in the same order, so
the two padded rows train on identical batches (checked: their per-step token counts must agree).

Timed window: steps ``--warmup``+1 to ``--warmup``+``--steps``; nothing is checkpointed,
scored or reported inside it. bioray reports once, at its last step (``train.report_every``
beyond the run), and the per-step real tokens and seconds come from that report's lists; the
reference's times come from a ``TrainerCallback`` that timestamps step ends (logging, saving and
the progress bar off). Per step, the slowest process's seconds count, on both sides. Real
(non-pad) tokens count, prompt and answer alike, summed over both processes. Rows run
``--rounds`` times each, in alternating order; each row is its own process (tree), started
cold, and its start-up is timed apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenise import DATA, ROOT, _config, _tokenizer  # noqa: E402  (same records, same tokenizer)

ROWS = ("reference", "bioray", "bioray_unpacked")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# The model every row loads (issue 18): Llama architecture, untied embeddings.
MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
         "intermediate_size": 688, "tie_word_embeddings": False}
VOCAB = 8000
SEED = 0
TARGETS = {"bioray_vs_reference": 1.3, "bioray_unpacked_vs_reference": 0.95}


def _job_config(work: Path, args, packing: bool = True) -> dict:
    """bioray's config for the job, as a plain dict (the rows change only ``data.packing`` and ``run.dir``)."""
    from bioray.config import to_dict

    raw = to_dict(_config(work, 1, parts=("train",)))
    raw["run"].update({"seed": SEED, "quiet": True})
    raw["data"].update({"max_seq_len": args.max_len, "overlong": "drop", "packing": packing})
    raw["train"].update({
        "num_workers": 2, "cpus_per_worker": 1.0, "micro_batch_size": 8, "grad_accum": 1,
        "max_steps": args.warmup + args.steps, "warmup_steps": args.warmup, "zero_stage": args.zero_stage,
        # One report, at the end (with the only checkpoint): none inside the timed window.
        "report_every": args.warmup + args.steps + 1, "checkpoint_every": 0, "keep_checkpoints": 1,
        "max_failures": 0,
    })
    raw["lora"].update({"rank": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": LORA_TARGETS})
    return raw


def _build_model(tok_path: str, out: Path, max_len: int) -> str:
    """The randomly initialised model every row loads, saved once (with the tokenizer) as a HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_path)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=max_len, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **MODEL)
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def _window_batches(raw: dict, cache: Path, pad_id: int, n: int) -> list[list[dict]]:
    """The first ``n`` micro-batches of each rank, exactly as ``fit``'s workers will read them.

    Returns:
        Per rank, per micro-batch: its real tokens, its padded size, and (to hand the reference
        the same rows) the unpadded ``input_ids`` and ``labels`` of unpacked rows.
    """
    from bioray.config import from_dict
    from bioray.data import micro_batches, training_dataset

    cfg = from_dict(raw)
    ds, _ = training_dataset(cfg, cache)
    # As fit() does: materialise, then one fixed shard per rank.
    shards = ds.materialize().split(cfg.train.num_workers, equal=True)
    out = []
    for shard in shards:
        batches, stream = [], micro_batches(shard, cfg.train.micro_batch_size, pad_id, cfg.data.packing)
        for _ in range(n):
            batch, real = next(stream)
            rows = []
            if not cfg.data.packing:  # padded rows: the mask says where each one ends
                rows = [(batch["input_ids"][k, :m].tolist(), batch["labels"][k, :m].tolist())
                        for k, m in enumerate(batch["attention_mask"].sum(1).tolist())]
            batches.append({"real": real, "padded": batch["input_ids"].numel(), "rows": rows})
        out.append(batches)
    return out


def _setup(work: Path, args) -> dict:
    """Builds what every row shares: corpus, tokenizer, model, tokenised cache and the reference's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from bioray.config import from_dict
    from bioray.corpus import build_corpus
    from bioray.data import tokenise

    start = time.time()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        raw = _job_config(work, args)
        cfg = from_dict(raw)
        corpus_dir = build_corpus(cfg)
        tok_path = _tokenizer(cfg, corpus_dir, work / "tok", vocab_size=VOCAB)
        model = _build_model(tok_path, work / "model", args.max_len)
        cache, meta = tokenise(cfg, corpus_dir, model)
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(model).pad_token_id
        n = args.warmup + args.steps
        expected = {}
        for row, packing in (("bioray", True), ("bioray_unpacked", False)):
            raw["data"]["packing"] = packing
            expected[row] = _window_batches(raw, cache, pad_id, n)
    finally:
        ray.shutdown()
    # The reference reads bioray's unpacked rows in order: rank 0's batch 0, rank 1's batch 0,
    # rank 0's batch 1, ...; with a sequential sampler, accelerate hands batch i to rank i % 2.
    ids, labels = [], []
    for b in range(n):
        for rank_batches in expected["bioray_unpacked"]:
            for i, lab in rank_batches[b]["rows"]:
                ids.append(i)
                labels.append(lab)
    pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                             "labels": pa.array(labels, pa.list_(pa.int32()))}), work / "reference.parquet")
    spec = {
        "config": raw, "model": model, "cache_dir": str(cache), "reference_data": str(work / "reference.parquet"),
        "warmup": args.warmup, "steps": args.steps, "work": str(work),
        "records": meta["records"], "tokens": meta["tokens"],
        "dropped_overlong": sum(s["dropped_overlong"] for s in meta["sources"].values()),
        # Per row and step (summed over ranks): the real and padded tokens its batches hold.
        "expected": {row: {"real": [sum(r[s]["real"] for r in per_rank) for s in range(n)],
                           "padded": [sum(r[s]["padded"] for r in per_rank) for s in range(n)]}
                     for row, per_rank in expected.items()},
        "setup_s": time.time() - start,
    }
    (work / "spec.json").write_text(json.dumps(spec))
    return spec


# ---------------------------------------------------------------------------------- rows


def _bioray_row(spec: dict, packing: bool, run_dir: Path) -> dict:
    """One bioray run (in its own process): Ray up, training dataset, ``fit``, Ray down."""
    import ray

    from bioray.config import from_dict
    from bioray.data import training_dataset
    from bioray.train import fit

    t0 = time.time()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t_ray = time.time()
    raw = json.loads(json.dumps(spec["config"]))
    raw["data"]["packing"] = packing
    raw["run"]["dir"] = str(run_dir)
    cfg = from_dict(raw)
    ds, _ = training_dataset(cfg, Path(spec["cache_dir"]))
    ds = ds.materialize()  # fit() would do it; done here to time data preparation apart
    t_data = time.time()
    result = fit(cfg, spec["model"], ds)
    t_fit = time.time()
    ray.shutdown()
    if result.error:
        raise result.error
    m = result.metrics
    # run_tokens_per_s spans the loop from its first step to the last report: its length.
    loop_s = sum(m["step_tokens"]) / m["run_tokens_per_s"]
    return {"step_tokens": m["step_tokens"], "step_seconds": m["step_seconds"], "loop_s": loop_s,
            "ray_init_s": t_ray - t0, "data_s": t_data - t_ray, "fit_s": t_fit - t_data,
            "bioray_file": __import__("bioray").__file__}


class _Counting:
    """Wraps a data collator and records each batch's real and padded tokens (this process's)."""

    def __init__(self, collate):
        self.collate, self.real, self.padded = collate, [], []

    def __call__(self, features):
        batch = self.collate(features)
        self.real.append(int(batch["attention_mask"].sum()))
        self.padded.append(batch["input_ids"].numel())
        return batch


def _reference_worker(spec: dict, result: Path) -> None:
    """One process of the reference (under torchrun): Trainer + peft LoRA + DDP over gloo, as the peers run it on CPU."""
    import torch

    torch.set_num_threads(1)
    import datasets
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    from bioray.config import from_dict

    cfg = from_dict(spec["config"])
    t = cfg.train

    class Clock(TrainerCallback):
        begin, ends = 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            Clock.begin = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            Clock.ends.append(time.time())

    class InOrder(Trainer):
        # The rows are already in bioray's shuffled order (see _setup): read them as they are.
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.config.use_cache = False  # no KV cache while training (LLaMA-Factory sets this too; bioray passes it)
    model = get_peft_model(model, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    data = datasets.Dataset.from_parquet(spec["reference_data"])
    collate = _Counting(DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
    args = TrainingArguments(
        output_dir=str(result.parent / "reference-out"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, max_steps=t.max_steps, learning_rate=t.lr,
        weight_decay=t.weight_decay, max_grad_norm=t.grad_clip, warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, optim="adamw_torch",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, seed=cfg.run.seed, bf16=False, fp16=False,
        use_cpu=True, ddp_backend="gloo",
        # Every LoRA weight gets a gradient: no search for unused ones (the Trainer's default for a
        # peft model is to search every step; LLaMA-Factory turns it off for LoRA too).
        ddp_find_unused_parameters=False,
    )
    trainer = InOrder(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    rank = int(os.environ["RANK"])
    (result.parent / f"{result.stem}-rank{rank}.json").write_text(json.dumps(
        {"begin": Clock.begin, "ends": Clock.ends, "real": collate.real, "padded": collate.padded,
         "torch_threads": torch.get_num_threads()}))


def _reference_row(spec: dict, result: Path, launch: float) -> dict:
    """Merges the reference's per-rank records: per step, tokens summed and the slowest rank's seconds."""
    ranks = [json.loads((result.parent / f"{result.stem}-rank{r}.json").read_text()) for r in range(2)]
    n = spec["warmup"] + spec["steps"]
    seconds = [max(r["ends"][s] - (r["ends"][s - 1] if s else r["begin"]) for r in ranks) for s in range(n)]
    return {"step_tokens": [sum(r["real"][s] for r in ranks) for s in range(n)], "step_seconds": seconds,
            "step_padded": [sum(r["padded"][s] for r in ranks) for s in range(n)],
            "loop_s": max(r["ends"][n - 1] - r["begin"] for r in ranks),
            "launch_to_first_step_s": max(r["begin"] for r in ranks) - launch,
            "torch_threads": [r["torch_threads"] for r in ranks]}


def _run(row: str, spec: dict, k: int) -> dict:
    """Runs one row in its own process (tree) and times it from launch to exit."""
    work = Path(spec["work"])
    result = work / f"{row}-{k}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    me = [str(Path(__file__).resolve()), "--spec", str(work / "spec.json"), "--result", str(result)]
    if row == "reference":
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", *me, "--row", "reference"]
    else:
        cmd = [sys.executable, *me, "--row", row]
    load = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        sys.exit(f"{row} run {k} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = _reference_row(spec, result, start) if row == "reference" else json.loads(result.read_text())
    w, n = spec["warmup"], spec["warmup"] + spec["steps"]
    tokens, seconds = sum(out["step_tokens"][w:n]), sum(out["step_seconds"][w:n])
    expected = spec["expected"]["bioray_unpacked" if row == "reference" else row]
    return {
        "tokens_per_s": tokens / seconds, "window_tokens": tokens, "window_seconds": seconds,
        "startup_s": wall - out["loop_s"], "wall_s": wall, "loop_s": out["loop_s"],
        "same_batches_as_planned": out["step_tokens"][:n] == expected["real"],
        "non_pad_fraction": sum(expected["real"][w:n]) / sum(expected["padded"][w:n]),
        "load_1min_before": load, "load_1min_after": os.getloadavg()[0],
        **{k2: v for k2, v in out.items() if k2 not in ("step_tokens", "step_seconds", "loop_s")},
        "step_seconds": [round(s, 4) for s in out["step_seconds"][:n]],
    }


def _summary(spec: dict, runs: dict, args, wall: float, loads: list) -> dict:
    med = {row: statistics.median(r["tokens_per_s"] for r in rs) for row, rs in runs.items()}
    result = {f"{row}_tokens_per_s": v for row, v in med.items()}
    pairs = {"bioray_vs_reference": "bioray", "bioray_unpacked_vs_reference": "bioray_unpacked"}
    pairs = {k: row for k, row in pairs.items() if row in med and "reference" in med}
    result.update({k: med[row] / med["reference"] for k, row in pairs.items()})
    # Ratios within each round too (the rows of a round ran back to back, under much the same load).
    result["ratios_per_round"] = [{k: runs[row][n]["tokens_per_s"] / runs["reference"][n]["tokens_per_s"]
                                   for k, row in pairs.items()} for n in range(args.rounds)]
    result["targets"] = {k: {"target": TARGETS[k], "median": result[k], "met": result[k] >= TARGETS[k]} for k in pairs}
    for row, rs in runs.items():
        tps = [r["tokens_per_s"] for r in rs]
        result[row] = {
            "tokens_per_s_median": med[row], "tokens_per_s_runs": tps, "spread": (max(tps) - min(tps)) / med[row],
            "startup_s_median": statistics.median(r["startup_s"] for r in rs),
            "non_pad_fraction": rs[0]["non_pad_fraction"],
            "same_batches_as_planned": all(r["same_batches_as_planned"] for r in rs),
            "runs": rs,
        }
    result.update({
        "rounds": args.rounds, "order": [list(ROWS if k % 2 == 0 else ROWS[::-1]) for k in range(args.rounds)],
        "warmup_steps": args.warmup, "timed_steps": args.steps, "zero_stage_bioray": args.zero_stage, "benchmark_wall_s": wall, "setup_s": spec["setup_s"],
        "load_1min": loads, "cpus": os.cpu_count(),
        "data": {"records": spec["records"], "tokens": spec["tokens"], "dropped_overlong": spec["dropped_overlong"],
                 "source": "train.tsv of NCBI-disease, BC5CDR-chem, BC5CDR-disease (../shared/data/ner)",
                 "max_len": args.max_len, "overlong": "drop", "template": "### Instruction / ### Input / ### Output",
                 "loss": "answer tokens only (labels -100 on the prompt and padding)"},
        "model": {**MODEL, "architecture": "LlamaForCausalLM", "vocab_size": VOCAB, "init_seed": SEED,
                  "dtype": "float32", "loaded_by_every_row_from": "one saved HF folder"},
        "job": {"processes": 2, "micro_batch_per_process": 8, "grad_accum": 1, "torch_threads_per_process": 1,
                "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": LORA_TARGETS},
                "data_parallel": {"reference": "torch DDP over gloo (Trainer use_cpu, ddp_backend gloo, "
                                                "ddp_find_unused_parameters False)",
                                  "bioray": f"DeepSpeed ZeRO-{args.zero_stage} over gloo (bioray always runs "
                                            "DeepSpeed; stage 0 is its plain data parallel)"},
                "optimizer": "torch AdamW, gradient clipping 1.0, warmup + cosine to 10% on both sides",
                "why_not_deepspeed_on_both": "transformers' Trainer + DeepSpeed does not run as two processes on "
                                             "CPU here: accelerate 1.15 gives DeepSpeed no backend without an "
                                             "accelerator and counts one process, so both ranks read the same "
                                             "batches while DeepSpeed averages gradients over two (seen here); "
                                             "so the reference runs DDP, its stock CPU path, and bioray the "
                                             "DeepSpeed stage that does what DDP does"},
        "sides": {
            "reference": "torchrun --standalone --nproc_per_node 2; transformers.Trainer (DDP, gloo) + peft "
                         "get_peft_model; "
                         "DataCollatorForSeq2Seq(padding='longest', label_pad_token_id=-100); the rows of "
                         "bioray_unpacked's window in the same order (SequentialSampler, accelerate's batch "
                         "sharding); logging, saving, evaluation and tqdm off; TrainerCallback timestamps each "
                         "step end; use_cache off; the Trainer's defaults otherwise (e.g. average_tokens_across_devices)",
            "bioray": "ray.init(num_cpus=2); bioray.data.training_dataset (mix, shuffle, first-fit-decreasing "
                      "packing into 256-token rows, position_ids restarting per example, no attention mask); "
                      "bioray.train.fit: TorchTrainer, 2 workers x 1 CPU, gloo, peft LoRA, deepspeed.initialize; "
                      "logits computed only at positions whose next token is an answer token (boolean "
                      "logits_to_keep + shift_labels: the same loss and gradients; the reference computes the "
                      "logits of every position, as the Trainer does by default); "
                      "report_every beyond the run, one checkpoint at the end, no validation; per-step tokens and "
                      "seconds from the final report's step_tokens/step_seconds",
            "bioray_unpacked": "as bioray with data.packing false: one example per row, padded to the longest in "
                               "the micro-batch, attention_mask given",
        },
        "measured": {
            "tokens_per_s": "real (non-pad) tokens of both processes over the timed window / the window's seconds, "
                            "each step counted at its slowest process",
            "startup_s": "the row's wall time (launch to exit) outside its training loop: process launch, imports, "
                         "Ray start, data preparation, model load, DeepSpeed init, and the end (bioray: its final "
                         "checkpoint; both: shutdown)",
            "non_pad_fraction": "real tokens / padded tokens in the timed window's micro-batches",
            "same_batches_as_planned": "each step's real tokens equal those of the batches planned in the setup "
                                       "(reference: bioray_unpacked's)",
        },
    })
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="where the JSON goes")
    p.add_argument("--rounds", type=int, default=3, help="runs per row, in alternating order")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 2),
                   help="bioray's ZeRO stage (0: DeepSpeed's plain data parallel, the reference's DDP counterpart)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    p.add_argument("--work", help="a kept work folder: reuse its setup (model, cache, rows) instead of building one")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="the rows to run (default: all)")
    # A row's own process (started by main):
    p.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.row:
        spec = json.loads(Path(args.spec).read_text())
        result = Path(args.result)
        if args.row == "reference":
            _reference_worker(spec, result)
        else:
            out = _bioray_row(spec, args.row == "bioray", Path(spec["work"]) / "runs" / result.stem)
            result.write_text(json.dumps(out))
        return
    if not args.out:
        p.error("--out is required")
    if not DATA.is_dir():
        sys.exit(f"real data not found at {DATA}")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bioray-bench-train-"))
    start = time.time()
    loads = [os.getloadavg()[0]]
    try:
        spec = json.loads((work / "spec.json").read_text()) if args.work else _setup(work, args)
        rows = [row for row in ROWS if row in args.rows]
        runs = {row: [] for row in rows}
        for k in range(args.rounds):
            for row in rows if k % 2 == 0 else rows[::-1]:
                runs[row].append(_run(row, spec, k))
                r = runs[row][-1]
                print(f"round {k + 1}/{args.rounds} {row}: {r['tokens_per_s']:.0f} tok/s, start-up {r['startup_s']:.1f}s, "
                      f"load {r['load_1min_before']:.2f}", flush=True)
            loads.append(os.getloadavg()[0])
        result = _summary(spec, runs, args, time.time() - start, loads)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k.endswith(("tokens_per_s", "_vs_reference", "targets"))},
                         indent=2))
    finally:
        if args.keep or args.work:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
