"""Ray Train + DeepSpeed (LoRA or full) fine-tuning: the worker loop and the trainer around it.

Each worker rebuilds the config from a plain dict, loads the base model, attaches LoRA, wraps
it with ``deepspeed.initialize`` and trains for exactly ``train.max_steps`` optimizer steps on
its shard of the packed, mixed dataset. Every ``train.checkpoint_every`` steps (and at the end)
the adapter is saved with the tokenizer and the resolved config and reported; the scorer pool
scores it while training goes on (Ray Train's ``ValidationConfig``), and ``CheckpointConfig``
keeps the best by task score.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

from bioray.config import Config, dump, from_dict, to_dict

log = logging.getLogger("bioray")

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "bioray.yaml"


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at ``max_steps``."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed config for ``cfg.train`` (ZeRO stage, offload, precision, accumulation)."""
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
        if t.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.zero_stage == 3:
        # Saving gathers partitioned weights explicitly (see _save_checkpoint); this keeps
        # DeepSpeed's own save path consistent with it.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.use_gpu},
        # Our optimizer is torch's AdamW (or DeepSpeedCPUAdam with offload); allow it under ZeRO.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def train_loop_per_worker(loop_config: dict) -> None:
    """The training loop one Ray Train worker runs (rank 0 writes, every rank trains)."""
    cfg = from_dict(loop_config["config"])
    if not cfg.train.use_gpu:
        # DeepSpeed picks its accelerator at import; without this it probes for CUDA.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from bioray.data import micro_batches
    from bioray.model import add_lora, load_base, load_tokenizer

    _quiet_report_lines()
    base_path = loop_config["base_path"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)
    if not cfg.train.use_gpu:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker + 0.5)))

    tokenizer = load_tokenizer(base_path, cfg)
    model = load_base(base_path, cfg, dtype=torch.bfloat16 if cfg.train.use_gpu else torch.float32)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if not cfg.train.full_finetune:
        model = add_lora(model, cfg)

    start_step, state = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = _restore(model, Path(d), cfg)
        start_step = state["step"]
        log.info("rank %d resumed at step %d", rank, start_step)

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s + start_step, cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg),
        dist_init_required=False,  # Ray Train already set up the process group
    )

    batches = micro_batches(ray.train.get_dataset_shard("train"), cfg.train.micro_batch_size,
                            tokenizer.pad_token_id, cfg.data.packing)
    first_loss = state.get("first_loss")
    window_loss, window_n, window_tokens, window_start = 0.0, 0, 0, time.time()
    run_start, steps_done, run_tokens = time.time(), 0, 0.0
    for step in range(start_step, cfg.train.max_steps):
        for _ in range(cfg.train.grad_accum):
            batch, real_tokens = next(batches)
            window_tokens += real_tokens
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            window_loss += loss.item()
            window_n += 1
        steps_done += 1
        done = step + 1
        is_ckpt = done == cfg.train.max_steps or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0)
        if not (is_ckpt or done % cfg.train.report_every == 0):
            continue
        # Mean loss and token count over all ranks; every rank takes part in the collective.
        stats = torch.tensor([window_loss, window_n, window_tokens], dtype=torch.float64)
        dist.all_reduce(stats)
        elapsed = time.time() - window_start
        loss_mean = stats[0].item() / max(stats[1].item(), 1)
        first_loss = loss_mean if first_loss is None else first_loss
        run_tokens += stats[2].item()
        metrics = {
            "step": done, "loss": loss_mean, "first_loss": first_loss, "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": stats[2].item() / max(elapsed, 1e-9),
            "run_tokens_per_s": run_tokens / max(time.time() - run_start, 1e-9),
        }
        if rank == 0 and not cfg.run.quiet:
            eta = (time.time() - run_start) / steps_done * (cfg.train.max_steps - done)
            log.info("train step %d/%d loss %.4f lr %.2e %.0f tok/s ETA %.0fs", done, cfg.train.max_steps,
                     loss_mean, metrics["lr"], metrics["tokens_per_s"], eta)
        if is_ckpt:
            _report_checkpoint(engine, cfg, tokenizer, metrics, rank, loop_config.get("validate", True))
        else:
            ray.train.report(metrics)
        window_loss, window_n, window_tokens, window_start = 0.0, 0, 0, time.time()


def _quiet_report_lines() -> None:
    """Drops Ray Train's per-worker "Reporting training result N: ..." INFO lines (rank 0 logs its own).

    Ray 2.60 logs them under ``logging.getLogger(__file__)``, outside ``ray.train``, so
    ``RunConfig(logging_config=...)`` does not reach them.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: the lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _restore(model, directory: Path, cfg: Config) -> dict:
    """Loads adapter (or full) weights and the trainer state from a checkpoint folder."""
    from safetensors.torch import load_file

    state = json.loads((directory / STATE_FILE).read_text())
    if cfg.train.full_finetune:
        weights = load_file(str(directory / "model.safetensors"))
        model.load_state_dict(weights, strict=False)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
    return state


def _report_checkpoint(engine, cfg: Config, tokenizer, metrics: dict, rank: int, validate: bool) -> None:
    """Saves the adapter (rank 0 writes; under ZeRO-3 every rank joins the gather) and reports it.

    With ``validate``, the report asks for scoring; its step travels with the request, so the scores
    are logged under the step of the checkpoint they belong to (``bioray.observe``).
    """
    import deepspeed
    import ray.train
    from ray.train import Checkpoint
    from ray.train.v2.api.validation_config import ValidationTaskConfig

    module = engine.module
    trainable = [p for p in module.parameters() if p.requires_grad] if not cfg.train.full_finetune \
        else list(module.parameters())
    with tempfile.TemporaryDirectory(prefix="bioray-ckpt-") as tmp:
        # ZeRO-3 partitions parameters across ranks: gather them (a collective, so every rank
        # enters) before rank 0 saves, or the adapter file holds empty tensors.
        ctx = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None) if cfg.train.zero_stage == 3 \
            else _nullcontext()
        with ctx:
            if rank == 0:
                module.save_pretrained(tmp, safe_serialization=True)
        checkpoint = None
        if rank == 0:
            tokenizer.save_pretrained(tmp)
            Path(tmp, CONFIG_FILE).write_text(dump(cfg))
            Path(tmp, STATE_FILE).write_text(json.dumps({"step": metrics["step"], "first_loss": metrics["first_loss"]}))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{metrics['step']:06d}",
                         validation=ValidationTaskConfig(fn_kwargs={"step": metrics["step"]})
                         if checkpoint is not None and validate else False)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fit(cfg: Config, base_path: str, cache_dir: Path, validation_fn=None, validation_kwargs: dict | None = None,
        metrics_log=None, tune_reports: bool = False):
    """Runs ``TorchTrainer`` for one config and returns Ray Train's ``Result``.

    Args:
        cfg: The run's (or trial's) config.
        base_path: ``from_pretrained`` path of the base model.
        cache_dir: The tokenised cache (see ``bioray.data.tokenise``).
        validation_fn: Scores a reported checkpoint (see ``bioray.evaluate.pool``); None = no scoring.
        validation_kwargs: JSON-serialisable keyword arguments for ``validation_fn``.
        metrics_log: A ``bioray.observe.MetricsLog`` actor; every report and every checkpoint's
            scores are sent to it (None = not logged).
        tune_reports: Inside a Tune trial: forward every report to Tune, with the latest task
            score from ``metrics_log`` (see ``bioray.observe.tune_report_callback``).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

    from bioray.data import training_dataset
    from bioray.observe import LoggedValidation, ReportToLog, tune_report_callback

    train_ds, plan = training_dataset(cfg, cache_dir)
    # Mix, shuffle and pack once, before the workers hold their CPUs: on a small cluster the
    # shuffle tasks would otherwise wait forever for a CPU the training workers hold (Ray never
    # oversubscribes). The packed epoch then streams from the object store.
    train_ds = train_ds.materialize()
    # Streaming the packed epoch to the workers runs in Ray Data's split coordinator (a worker
    # process, where progress would be bars); rank 0's step lines are the progress of this stage.
    train_ds.context.enable_progress_bars = False
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    scored = validation_fn is not None
    callbacks = [ReportToLog(metrics_log)] if metrics_log is not None else []
    if tune_reports:
        callbacks.append(tune_report_callback(metrics_log))
    run_config = RunConfig(
        name="checkpoints",
        storage_path=cfg.run.storage or str(Path(cfg.run.dir).resolve()),
        checkpoint_config=CheckpointConfig(
            num_to_keep=t.keep_checkpoints,
            checkpoint_score_attribute="score" if scored else "step",
            checkpoint_score_order="max",
        ),
        failure_config=FailureConfig(max_failures=t.max_failures),
        # Runs in the Train controller: one record per report, however many workers report it.
        callbacks=callbacks,
        # Ray Train's INFO lines (each worker's every report, worker-group start-up) repeat what
        # rank 0's step lines and the scorer's lines already say; warnings and errors still show.
        logging_config=LoggingConfig(log_level="WARNING"),
    )
    validation_config = None
    if scored:
        validation_config = ValidationConfig(
            # Takes the report's `step` and sends the scores to metrics_log once they exist.
            fn=LoggedValidation(validation_fn, metrics_log),
            task_config=ValidationTaskConfig(fn_kwargs=validation_kwargs or {}),
            # DEFAULT scheduling: inside a Tune trial the task would otherwise be captured by the
            # trial's placement group and wait forever for a busy bundle (FACTS.md).
            ray_remote_kwargs={"num_cpus": 0.05, "scheduling_strategy": "DEFAULT"},
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "base_path": base_path, "validate": scored},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=run_config,
        datasets={"train": train_ds},
        validation_config=validation_config,
    )
    return trainer.fit(), plan
