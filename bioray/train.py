"""Ray Train + DeepSpeed (LoRA or full) fine-tuning: the worker loop and the trainer around it.

Each worker rebuilds the config from a plain dict, loads the base model, attaches LoRA, wraps
it with ``deepspeed.initialize`` and trains for exactly ``train.max_steps`` optimizer steps on
its shard of the packed, mixed dataset. Every ``train.checkpoint_every`` steps (and at the end)
the adapter (or, with ``train.full_finetune``, the whole model) is saved with the tokenizer and
the resolved config and reported; the scorer pool scores it while training goes on (Ray Train's
``ValidationConfig``), and ``CheckpointConfig`` keeps the best by task score.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from bioray.checkpoint import CONFIG_FILE, STATE_FILE, step_dir_name
from bioray.config import Config, dump, from_dict, to_dict

log = logging.getLogger("bioray")


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed config for ``cfg.train`` (ZeRO stage, offload, precision, accumulation)."""
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
        if t.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.zero_stage == 3:
        # Saving gathers partitioned weights explicitly (see _report_checkpoint); this keeps
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
    base_path, validate = loop_config["base_path"], loop_config["validate"]
    t = cfg.train
    if not t.use_gpu:
        # DeepSpeed picks its accelerator at import; without this it probes for CUDA.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import torch

    from bioray._ray import quiet_train_report_lines
    from bioray.data import micro_batches
    from bioray.model import load_tokenizer
    from bioray.optim import adamw, lr_schedule

    quiet_train_report_lines()
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)
    if not t.use_gpu:
        torch.set_num_threads(max(1, int(t.cpus_per_worker + 0.5)))

    # The model, and where a checkpoint says training stopped.
    tokenizer = load_tokenizer(base_path, cfg)
    model = _trainable_model(cfg, base_path, torch.bfloat16 if t.use_gpu else torch.float32)
    state = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = _restore(model, Path(d), cfg)
        log.info("rank %d resumed at step %d", rank, state["step"])
    start_step = state.get("step", 0)

    # The engine: DeepSpeed around the model, its optimizer and the LR schedule.
    optimizer = adamw((p for p in model.parameters() if p.requires_grad), t.lr, t.weight_decay, t.offload)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_schedule(optimizer, t.warmup_steps, t.max_steps, start_step),
        config=deepspeed_config(cfg), dist_init_required=False,  # Ray Train already set up the process group
    )

    # The loop: exactly max_steps optimizer steps, over as many epochs of the shard as it takes.
    batches = micro_batches(ray.train.get_dataset_shard("train"), t.micro_batch_size, tokenizer.pad_token_id,
                            cfg.data.packing)
    meter = _Meter(start_step, state.get("first_loss"))
    for step in range(start_step, t.max_steps):
        for _ in range(t.grad_accum):
            batch, real_tokens = next(batches)
            loss = engine(**{k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer and the schedule at accumulation boundaries
            meter.add(loss.item(), real_tokens)
        done = step + 1
        is_ckpt = done == t.max_steps or (t.checkpoint_every and done % t.checkpoint_every == 0)
        if not (is_ckpt or done % t.report_every == 0):
            continue
        metrics = meter.report(done, scheduler.get_last_lr()[0])  # a collective: every rank calls it
        if rank == 0 and not cfg.run.quiet:
            eta = meter.seconds_per_step() * (t.max_steps - done)
            log.info("train step %d/%d loss %.4f lr %.2e %.0f tok/s ETA %.0fs", done, t.max_steps,
                     metrics["loss"], metrics["lr"], metrics["tokens_per_s"], eta)
        if is_ckpt:
            _report_checkpoint(engine, cfg, tokenizer, metrics, rank, base_path, validate)
        else:
            ray.train.report(metrics)


class _Meter:
    """Loss and real-token counts between reports, averaged over all ranks when reported."""

    def __init__(self, start_step: int, first_loss: float | None):
        self.start_step = self.step = start_step
        self.first_loss = first_loss
        self.run_start, self.run_tokens = time.time(), 0.0
        self._reset()

    def _reset(self) -> None:
        self.loss, self.n, self.tokens, self.start = 0.0, 0, 0, time.time()

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.n, self.tokens = self.loss + loss, self.n + 1, self.tokens + tokens

    def seconds_per_step(self) -> float:
        """Over this worker's run so far (since its start or resume)."""
        return (time.time() - self.run_start) / max(self.step - self.start_step, 1)

    def report(self, step: int, lr: float) -> dict:
        """The run's metrics at ``step``: an all-reduce, so every rank must call it."""
        import torch
        import torch.distributed as dist

        stats = torch.tensor([self.loss, self.n, self.tokens], dtype=torch.float64)
        dist.all_reduce(stats)
        loss, n, tokens = stats.tolist()
        mean = loss / max(n, 1)
        self.first_loss = mean if self.first_loss is None else self.first_loss
        self.run_tokens += tokens
        self.step = step
        now = time.time()
        metrics = {"step": step, "loss": mean, "first_loss": self.first_loss, "lr": lr,
                   "tokens_per_s": tokens / max(now - self.start, 1e-9),
                   "run_tokens_per_s": self.run_tokens / max(now - self.run_start, 1e-9)}
        self._reset()
        return metrics


def _trainable_model(cfg: Config, base_path: str, dtype):
    """The base model, with gradient checkpointing and a LoRA adapter where the config asks."""
    from bioray.model import add_lora, load_base

    model = load_base(base_path, cfg, dtype=dtype)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model if cfg.train.full_finetune else add_lora(model, cfg)


def _restore(model, directory: Path, cfg: Config) -> dict:
    """Loads adapter (or full) weights and the trainer state from a checkpoint folder."""
    from safetensors.torch import load_file

    state = json.loads((directory / STATE_FILE).read_text())
    if cfg.train.full_finetune:
        model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
    return state


def _report_checkpoint(engine, cfg: Config, tokenizer, metrics: dict, rank: int, base_path: str,
                       validate: bool) -> None:
    """Saves the adapter or model (rank 0 writes; under ZeRO-3 every rank joins the gather) and reports it.

    With ``validate``, the report asks for scoring; its step travels with the request, so the scores
    are logged under the step of the checkpoint they belong to (``bioray.observe``).
    """
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from bioray._ray import ValidationTaskConfig

    module = engine.module
    params = list(module.parameters()) if cfg.train.full_finetune else \
        [p for p in module.parameters() if p.requires_grad]
    with tempfile.TemporaryDirectory(prefix="bioray-ckpt-") as tmp:
        # ZeRO-3 partitions parameters across ranks: gather them (a collective, so every rank
        # enters) before rank 0 saves, or the saved file holds empty tensors.
        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.train.zero_stage == 3 \
            else nullcontext()
        with gathered:
            if rank == 0:
                module.save_pretrained(tmp, safe_serialization=True)
        checkpoint = None
        if rank == 0:
            tokenizer.save_pretrained(tmp)
            Path(tmp, CONFIG_FILE).write_text(dump(cfg))
            # base_model: what a full checkpoint was trained from (an adapter's config says it too).
            Path(tmp, STATE_FILE).write_text(json.dumps({"step": metrics["step"], "first_loss": metrics["first_loss"],
                                                         "base_model": base_path}))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=step_dir_name(metrics["step"]),
                         validation=ValidationTaskConfig(fn_kwargs={"step": metrics["step"]})
                         if checkpoint is not None and validate else False)


def fit(cfg: Config, base_path: str, train_ds, validation_fn=None, validation_kwargs: dict | None = None,
        metrics_log=None, tune_reports: bool = False):
    """Runs ``TorchTrainer`` for one config and returns Ray Train's ``Result``.

    Args:
        cfg: The run's (or trial's) config.
        base_path: ``from_pretrained`` path of the base model.
        train_ds: The mixed, packed training Dataset (``bioray.data.training_dataset``).
        validation_fn: Scores a reported checkpoint (see ``bioray.evaluate.pool``); None = no scoring.
        validation_kwargs: JSON-serialisable keyword arguments for ``validation_fn``.
        metrics_log: A ``bioray.observe.MetricsLog`` actor; every report and every checkpoint's
            scores are sent to it (None = not logged).
        tune_reports: Inside a Tune trial: forward every report to Tune, with the latest task
            score from ``metrics_log`` (see ``bioray.observe.tune_report_callback``).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bioray._ray import ValidationConfig, ValidationTaskConfig
    from bioray.observe import LoggedValidation, ReportToLog, tune_report_callback

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
    return trainer.fit()
