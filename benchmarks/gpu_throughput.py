"""GPU training throughput at Llama-3-8B shape: real tokens/s per GPU, MFU and peak memory.

    bash benchmarks/gpu.sh                                       # one H100/H200, under 8 minutes
    python benchmarks/gpu_throughput.py --out runs/bench/gpu.json  # the same, without the wrapper
    python benchmarks/gpu_throughput.py --tiny --out /tmp/gpu.json # CPU, tiny shape: the script end to end

Each configuration (attention implementation x gradient checkpointing) runs in its own process
(one after the other, each implementation without checkpointing first; ``--no-isolate`` runs them
in this one; none starts after ``--budget-s``): a Llama-3-8B-shaped model (hidden
4096, 32 layers, 32 heads, 8 KV heads, intermediate 14,336, vocabulary 128,256, untied) with
random weights from one seed, built on the GPU (nothing is downloaded), bf16; LoRA r=16 on every
linear layer (``bioray.model.add_lora``); DeepSpeed with bioray's own config
(``bioray.train.deepspeed_config``: ZeRO-2, bf16) and optimizer; the training step of bioray's
worker loop (engine forward, backward, step, ``loss.item()``). The data are synthetic examples
(seeded lengths, the first part of each a prompt without labels) packed by bioray into rows of
``--seq`` tokens and collated as its workers do (``bioray.data.pack_examples``, ``collate``):
``position_ids`` restart at 0 per example, no attention mask, logits only at answer positions.
Packed examples stay apart without a dense mask where the implementation allows it:
``flash_attention_2`` (varlen, from the restarting ``position_ids``; only if flash-attn is
installed), ``flex_attention`` (a block-sparse ``BlockMask``), and ``sdpa`` (transformers detects
the packing from ``position_ids`` and hands sdpa a boolean 4-D mask: dense, the baseline).

FLOPs (model FLOPs: recomputation under gradient checkpointing does not count), per step, for a
frozen base with LoRA, T real tokens, K answer positions (logits computed), N_body the frozen
linear weights of the decoder layers, N_head the LM head's, N_lora the adapters':

    forward   2*N_body*T + 2*N_head*K + 2*N_lora*T + A
    backward  2*N_body*T + 2*N_head*K               (frozen weights: activation gradients only)
              + 4*N_lora*T                           (adapters: activation and weight gradients)
              + 2*A
    A = sum over layers and packed examples of length L of 2*L*(L+1)*hidden (QK^T and AV, causal)

MFU = those FLOPs per second / the GPU's peak dense bf16 FLOPs (989.4 TFLOPS for H100 SXM and
H200; ``--peak-tflops`` for others). ``mfu_4n`` is the convention of NVIDIA NeMo AutoModel's
published LoRA figure (12,473 tokens/s per H100 at seq 4096, 40.6% MFU: 4 * all base parameters
* tokens, embeddings and the LM head on every token included), for comparison with it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": False}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 512, "tie_word_embeddings": False}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Peak dense bf16 tensor FLOPs by device name (NVIDIA data sheets; sparsity not counted).
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
             ("A100", 312e12)]
PUBLISHED = {"source": "NVIDIA NeMo AutoModel, Llama-3-8B LoRA, seq 4096, H100",
             "tokens_per_s_per_gpu": 12473, "mfu": 0.406}
MFU_TARGET = 0.45
SEED = 0


def _attn_implementations(cuda: bool) -> list[str]:
    """The implementations to measure here, the likely fastest first."""
    from transformers.utils import is_flash_attn_2_available

    found = ["flash_attention_2"] if cuda and is_flash_attn_2_available() else []
    return found + ["flex_attention", "sdpa"] if cuda else ["sdpa"]


def _examples(args, vocab: int, n_tokens: int) -> tuple[list, list]:
    """Seeded synthetic examples: lengths log-normal around ``--median-len``, the first part a prompt (no labels)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    ids, labels, total = [], [], 0
    while total < n_tokens:
        n = int(np.clip(rng.lognormal(np.log(args.median_len), 0.8), 16, args.seq))
        x = rng.integers(3, vocab, n).astype(np.int32)
        y = x.copy()
        y[: n - max(1, int(n * args.answer_share))] = -100
        ids.append(x)
        labels.append(y)
        total += n
    return ids, labels


def _micro_batches(args, vocab: int, n: int) -> list[tuple[dict, dict]]:
    """``n`` micro-batches as bioray's workers collate them, each with its token and FLOPs counts."""
    import numpy as np

    from bioray.data import collate, pack_examples

    ids, labels = _examples(args, vocab, int(args.seq * args.micro_batch * n * 1.1))
    packed = pack_examples(ids, labels, args.seq, packing=True, seed=SEED)
    rows = [{k: packed[k][i] for k in packed} for i in range(len(packed["input_ids"]))]
    out = []
    for b in range(n):
        group = rows[b * args.micro_batch:(b + 1) * args.micro_batch]
        batch = collate(group, pad_id=0, packing=True, answer_logits=True)
        lengths = []
        for r in group:
            starts = list(np.flatnonzero(np.asarray(r["position_ids"]) == 0)) + [len(r["position_ids"])]
            lengths += [b2 - a for a, b2 in zip(starts, starts[1:])]
        out.append((batch, {"real": sum(len(r["input_ids"]) for r in group), "padded": batch["input_ids"].numel(),
                            "answer_positions": int(batch["logits_to_keep"].sum()), "example_lengths": lengths}))
    return out


def _step_flops(counts: dict, shape: dict, n_body: int, n_head: int, n_lora: int) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    t, k = counts["real"], counts["answer_positions"]
    attn = shape["num_hidden_layers"] * sum(2 * L * (L + 1) * shape["hidden_size"] for L in counts["example_lengths"])
    forward = 2 * n_body * t + 2 * n_head * k + 2 * n_lora * t + attn
    backward = 2 * n_body * t + 2 * n_head * k + 4 * n_lora * t + 2 * attn
    return forward + backward


def _peak_flops(args, device_name: str) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    for name, flops in PEAK_BF16:
        if name in device_name:
            return flops, f"data sheet, dense bf16 ({name})"
    return None, "unknown device: pass --peak-tflops"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(args, attn: str, checkpointing: bool) -> dict:
    """One configuration, in this process: build, wrap, train ``--warmup`` + ``--steps`` steps, measure."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed probes for CUDA at import otherwise
        # One thread: on a shared CPU, OpenMP threads that wait on each other made tiny steps take
        # 0.02 s to 4.6 s (seen here); the CPU run checks the script, it measures nothing.
        torch.set_num_threads(1)
    import deepspeed
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bioray.config import from_dict
    from bioray.model import add_lora
    from bioray.optim import lr_schedule, optimizer
    from bioray.train import _takes_logit_mask, deepspeed_config

    shape = TINY if args.tiny else LLAMA3_8B
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = from_dict({
        "train": {"use_gpu": cuda, "num_workers": 1, "micro_batch_size": args.micro_batch, "zero_stage": 2,
                  "max_steps": args.warmup + args.steps, "warmup_steps": args.warmup, "gradient_checkpointing": checkpointing},
        "lora": {"rank": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": ALL_LINEAR},
    })
    if not deepspeed.comm.is_initialized():
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    torch.manual_seed(SEED)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    config = LlamaConfig(max_position_embeddings=args.seq, **shape)
    with device:  # weights are created where they train: no 16 GB copy from host memory
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    n_all = sum(p.numel() for p in model.parameters())
    n_head = model.get_output_embeddings().weight.numel()
    n_body = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    if checkpointing:  # as bioray.train._trainable_model does
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = add_lora(model, cfg)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert _takes_logit_mask(model), "this transformers computes every logit: the FLOPs below would be wrong"
    t = cfg.train
    opt = optimizer((p for p in model.parameters() if p.requires_grad), t.optimizer, t.lr, t.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg),
                                           lr_scheduler=lr_schedule(opt, t.warmup_steps, t.max_steps),
                                           dist_init_required=False)
    build_s = time.perf_counter() - start
    batches = _micro_batches(args, shape["vocab_size"], t.max_steps)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seconds, losses = [], []
    for batch, _ in batches:
        sync()
        begin = time.perf_counter()
        loss = engine(**{k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())  # a sync point, as in bioray's loop
        sync()
        seconds.append(time.perf_counter() - begin)
    timed = slice(args.warmup, None)
    counts = [c for _, c in batches][timed]
    window_s = sum(seconds[timed])
    real = sum(c["real"] for c in counts)
    flops = sum(_step_flops(c, shape, n_body, n_head, n_lora) for c in counts)
    peak, _ = _peak_flops(args, torch.cuda.get_device_name(0) if cuda else "cpu")
    return {
        "attn_implementation": attn, "gradient_checkpointing": checkpointing,
        "tokens_per_s": real / window_s, "step_seconds_median": statistics.median(seconds[timed]),
        "step_seconds": [round(s, 4) for s in seconds], "real_tokens_per_step": real / len(counts),
        "non_pad_fraction": real / sum(c["padded"] for c in counts),
        "answer_positions_per_step": sum(c["answer_positions"] for c in counts) / len(counts),
        "model_tflops_per_s": flops / window_s / 1e12,
        "mfu": flops / window_s / peak if peak else None,
        "mfu_4n": 4 * n_all * real / window_s / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "params": {"all": n_all, "body_linear": n_body, "lm_head": n_head, "lora": n_lora},
        "first_loss": losses[0], "last_loss": losses[-1], "build_s": build_s,
    }


def _isolated(args, attn: str, checkpointing: bool, timeout: float) -> dict:
    """``run_config`` in a fresh process: memory and compiled kernels of one config never reach the next."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", attn, str(int(checkpointing)), *sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"attn_implementation": attn, "gradient_checkpointing": checkpointing,
                "error": f"stopped after {timeout:.0f}s (time budget)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"attn_implementation": attn, "gradient_checkpointing": checkpointing,
            "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:500]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="where the JSON goes")
    p.add_argument("--tiny", action="store_true", help="a tiny shape that runs anywhere (CPU): checks the script")
    p.add_argument("--seq", type=int, help="packed row length (default 4096; --tiny 256)")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per step")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; --tiny 1)")
    p.add_argument("--steps", type=int, help="timed steps (default 10; --tiny 2)")
    p.add_argument("--median-len", type=int, help="median example length (default 512; --tiny 48)")
    p.add_argument("--answer-share", type=float, default=0.5,
                   help="share of each example that is answer (labelled); 0.5 is the NER records' share here")
    p.add_argument("--attn", nargs="+", help="attention implementations (default: every one available here)")
    p.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOPS, where its name is not known")
    p.add_argument("--budget-s", type=float, default=450, help="start no configuration after this many seconds")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each configuration in its own process (default: on with CUDA)")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: run one configuration, print its JSON
    args = p.parse_args()
    for name, full, tiny in (("seq", 4096, 256), ("warmup", 3, 1), ("steps", 10, 2), ("median_len", 512, 48)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.one:
        print(json.dumps(run_config(args, args.one[0], args.one[1] == "1")), flush=True)
        return
    if not args.out:
        p.error("--out is required")
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    isolate = cuda if args.isolate is None else args.isolate
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak, peak_source = _peak_flops(args, device_name)
    start = time.time()
    configs, longest = [], 0.0
    # Every implementation without checkpointing first: if the budget runs out, what is lost is
    # the slower, memory-saving variant of the last ones.
    for gc in args.checkpointing:
        for attn in args.attn or _attn_implementations(cuda):
            left = args.budget_s - (time.time() - start)
            if left < longest:
                configs.append({"attn_implementation": attn, "gradient_checkpointing": gc == "on",
                                "error": "not run: time budget (--budget-s)"})
                continue
            began = time.time()
            if isolate:
                configs.append(_isolated(args, attn, gc == "on", left))
            else:
                try:
                    configs.append(run_config(args, attn, gc == "on"))
                except Exception as e:  # one configuration failing (OOM, no kernel) must not lose the others
                    configs.append({"attn_implementation": attn, "gradient_checkpointing": gc == "on",
                                    "error": f"{type(e).__name__}: {e}"[:500]})
            longest = max(longest, time.time() - began)
            print(json.dumps({k: v for k, v in configs[-1].items() if k != "step_seconds"}), flush=True)
    ok = [c for c in configs if "error" not in c]
    best = max(ok, key=lambda c: c["tokens_per_s"]) if ok else None
    result = {
        "tiny": args.tiny, "device": device_name, "cuda": cuda, "measured_on_gpu": cuda and not args.tiny,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "shape": {**(TINY if args.tiny else LLAMA3_8B), "architecture": "LlamaForCausalLM", "init_seed": SEED},
        "dtype": "bfloat16" if cuda else "float32", "seq_len": args.seq, "micro_batch": args.micro_batch,
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": ALL_LINEAR},
        "deepspeed": "ZeRO-2 (bioray.train.deepspeed_config), one process, bf16 on GPU / fp32 on CPU",
        "data": {"examples": f"synthetic, seeded; lengths log-normal around {args.median_len} (sigma 0.8) clipped to "
                             f"[16, {args.seq}]; the last {args.answer_share:.0%} of each example labelled",
                 "packing": "bioray.data.pack_examples (first-fit decreasing), collate(answer_logits=True)"},
        "flops_formula": {
            "forward": "2*N_body*T + 2*N_head*K + 2*N_lora*T + A",
            "backward": "2*N_body*T + 2*N_head*K + 4*N_lora*T + 2*A (frozen weights: activation gradients only)",
            "A": "sum over layers and packed examples of length L of 2*L*(L+1)*hidden (causal QK^T and AV)",
            "symbols": "T real tokens, K answer positions (logits computed), N_body frozen decoder linear weights, "
                       "N_head LM head, N_lora adapters; recomputation (gradient checkpointing) not counted",
            "mfu_4n": "4 * all base parameters * T (NeMo AutoModel's convention for its published LoRA MFU)"},
        "peak_flops": peak, "peak_flops_source": peak_source,
        "configs": configs,
        "best": {k: best[k] for k in ("attn_implementation", "gradient_checkpointing", "tokens_per_s", "mfu",
                                      "mfu_4n", "peak_memory_gib")} if best else None,
        "target": {"mfu": MFU_TARGET, "met": (best["mfu"] >= MFU_TARGET) if best and best["mfu"] else None},
        "published": PUBLISHED, "wall_s": time.time() - start, "isolated": isolate,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"best": result["best"], "wall_s": round(result["wall_s"], 1)}, indent=2))


if __name__ == "__main__":
    main()
