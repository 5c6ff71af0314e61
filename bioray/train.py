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
import sys
import tempfile
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

from bioray._version import __version__
from bioray.checkpoint import (CONFIG_FILE, DEEPSPEED_TAG, RESUME_DIR, STATE_FILE, rng_file, step_dir_name, verify,
                               write_checksums)
from bioray.errors import CheckpointError
from bioray.storage import CHECKPOINTS, run_root
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
        "bf16": {"enabled": precision(cfg) == "bf16"},
        # fp16 needs loss scaling (DeepSpeed's dynamic scaler); bf16 and fp32 do not.
        "fp16": {"enabled": precision(cfg) == "fp16"},
        # Our optimizer is torch's AdamW (or DeepSpeedCPUAdam with offload); allow it under ZeRO.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def precision(cfg: Config) -> str:
    """``train.precision`` with ``auto`` resolved: bf16 on GPU, fp32 on CPU."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if cfg.train.use_gpu else "fp32"


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
    from bioray.optim import lr_schedule, optimizer

    quiet_train_report_lines()
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)
    if not t.use_gpu:
        torch.set_num_threads(max(1, int(t.cpus_per_worker + 0.5)))

    # The model, and where the latest checkpoint (if any) says training stopped.
    # The base as this node sees it: base_path, or its copy downloaded from run.storage once per node.
    from bioray.storage import node_copy

    local_base = node_copy(base_path, loop_config.get("base_uri"))
    tokenizer = load_tokenizer(local_base, cfg)
    model = _trainable_model(cfg, base_path, {"bf16": torch.bfloat16, "fp16": torch.float16,
                                              "fp32": torch.float32}[precision(cfg)], load_from=local_base)
    checkpoint = ray.train.get_checkpoint()
    opened = ExitStack()  # the checkpoint's folder (a download from remote storage) until it is loaded
    resume_dir = _verified_checkpoint(checkpoint, cfg, opened) if checkpoint else None
    state = _load_weights(model, resume_dir, cfg) if resume_dir else {}
    start_step = state.get("step", 0)

    # The engine: DeepSpeed around the model, its optimizer and the LR schedule; on resume also the
    # optimizer moments, the schedule's position and this rank's random state.
    opt = optimizer((p for p in model.parameters() if p.requires_grad), t.optimizer, t.lr, t.weight_decay, t.offload)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=lr_schedule(opt, t.warmup_steps, t.max_steps, start_step, t.lr_scheduler),
        config=deepspeed_config(cfg), dist_init_required=False,  # Ray Train already set up the process group
    )
    if resume_dir:
        _load_training_state(engine, resume_dir, rank)
        opened.close()
        log.info("rank %d resumed at step %d (micro-batch %d of its shard)", rank, start_step,
                 start_step * t.grad_accum)

    # The loop: exactly max_steps optimizer steps, over as many epochs of this rank's shard as it
    # takes; a resumed run passes over the micro-batches it already trained on.
    batches = micro_batches(ray.train.get_dataset_shard(shard_name(rank)), t.micro_batch_size,
                            tokenizer.pad_token_id, cfg.data.packing, skip=start_step * t.grad_accum,
                            answer_logits=_takes_logit_mask(model))
    meter = _Meter(start_step, state.get("first_loss"))
    bar = None
    if rank == 0 and loop_config.get("progress_bar"):
        # Ray's tqdm: the worker sends updates, the driver draws one bar (stdout is a terminal there).
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=t.max_steps, initial=start_step, desc="train", unit="step")
    for step in range(start_step, t.max_steps):
        meter.begin_step()
        for _ in range(t.grad_accum):
            batch, real_tokens = next(batches)
            loss = engine(**{k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer and the schedule at accumulation boundaries
            meter.add(loss.item(), real_tokens)
        meter.end_step()
        if bar is not None:
            bar.update(1)
        done = step + 1
        is_ckpt = done == t.max_steps or (t.checkpoint_every and done % t.checkpoint_every == 0)
        if not (is_ckpt or done % t.report_every == 0):
            continue
        metrics = meter.report(done, scheduler.get_last_lr()[0])  # a collective: every rank calls it
        if bar is not None:
            bar.set_description(f"train loss {metrics['loss']:.4f}")
        elif rank == 0 and not cfg.run.quiet:
            eta = meter.seconds_per_step() * (t.max_steps - done)
            log.info("train step %d/%d loss %.4f lr %.2e %.0f tok/s ETA %.0fs", done, t.max_steps,
                     metrics["loss"], metrics["lr"], metrics["tokens_per_s"], eta)
        if is_ckpt:
            _report_checkpoint(engine, cfg, tokenizer, metrics, rank, base_path, validate)
        else:
            ray.train.report(metrics)


def shard_name(rank: int) -> str:
    """The name of rank ``rank``'s training dataset (see :func:`fit`)."""
    return f"train_{rank}"


class _Meter:
    """Loss and real-token counts between reports, averaged over all ranks when reported."""

    def __init__(self, start_step: int, first_loss: float | None):
        self.start_step = self.step = start_step
        self.first_loss = first_loss
        self.run_start, self.run_tokens = time.time(), 0.0
        self._reset()

    def _reset(self) -> None:
        # This rank's loss, real tokens and seconds of each step since the last report.
        self.step_losses: list[float] = []
        self.step_tokens: list[int] = []
        self.step_seconds: list[float] = []
        self.loss, self.n, self.tokens, self.start = 0.0, 0, 0, time.time()
        self._step_loss, self._step_n, self._step_tokens, self._step_start = 0.0, 0, 0, time.time()

    def begin_step(self) -> None:
        """Starts an optimizer step's clock (its data loading counts, the previous report does not)."""
        self._step_start = time.time()

    def add(self, loss: float, tokens: int) -> None:
        """One micro-batch's loss and real tokens."""
        self.loss, self.n, self.tokens = self.loss + loss, self.n + 1, self.tokens + tokens
        self._step_loss, self._step_n, self._step_tokens = self._step_loss + loss, self._step_n + 1, \
            self._step_tokens + tokens

    def end_step(self) -> None:
        """Closes an optimizer step (``train.grad_accum`` micro-batches)."""
        now = time.time()
        self.step_losses.append(self._step_loss / max(self._step_n, 1))
        self.step_tokens.append(self._step_tokens)
        self.step_seconds.append(now - self._step_start)
        self._step_loss, self._step_n, self._step_tokens = 0.0, 0, 0

    def seconds_per_step(self) -> float:
        """Over this worker's run so far (since its start or resume)."""
        return (time.time() - self.run_start) / max(self.step - self.start_step, 1)

    def report(self, step: int, lr: float) -> dict:
        """The run's metrics at ``step``: all-reduces, so every rank must call it.

        Besides the window's means, three lists speak for every step since the last report, over
        all ranks: ``step_losses`` (mean loss; what a resumed run is compared by, step for step),
        ``step_tokens`` (real tokens, summed) and ``step_seconds`` (the slowest rank's wall time,
        the time the step took the run). The time between reports includes the report itself;
        the per-step lists do not (benchmarks/train_throughput.py reads them).
        """
        import torch
        import torch.distributed as dist

        k = len(self.step_losses)
        sums = torch.tensor([self.loss, self.n, self.tokens, *self.step_losses, *self.step_tokens],
                            dtype=torch.float64)
        dist.all_reduce(sums)
        slowest = torch.tensor(self.step_seconds, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        loss, n, tokens = sums[:3].tolist()
        mean = loss / max(n, 1)
        self.first_loss = mean if self.first_loss is None else self.first_loss
        self.run_tokens += tokens
        self.step = step
        now = time.time()
        world = dist.get_world_size()
        metrics = {"step": step, "loss": mean, "first_loss": self.first_loss, "lr": lr,
                   "step_losses": [v / world for v in sums[3:3 + k].tolist()],
                   "step_tokens": [int(v) for v in sums[3 + k:].tolist()],
                   "step_seconds": slowest.tolist(),
                   "tokens_per_s": tokens / max(now - self.start, 1e-9),
                   "run_tokens_per_s": self.run_tokens / max(now - self.run_start, 1e-9)}
        self._reset()
        return metrics


def _takes_logit_mask(model) -> bool:
    """Whether the model computes logits only where told (a boolean ``logits_to_keep``, transformers 5).

    Only transformers' own causal LMs: they slice the hidden states before the LM head and hand
    ``shift_labels`` to their loss; remote code may take ``logits_to_keep`` as a count only.
    """
    import inspect

    import transformers.modeling_utils

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # slice_logits_to_keep: the helper that takes a boolean mask (absent where only counts work).
    return hasattr(transformers.modeling_utils, "slice_logits_to_keep") and \
        type(base).__module__.startswith("transformers.") and \
        "logits_to_keep" in inspect.signature(base.forward).parameters


def _trainable_model(cfg: Config, base_path: str, dtype, load_from: str | None = None):
    """The base model, with gradient checkpointing and a LoRA adapter where the config asks.

    ``load_from``: this node's copy of ``base_path`` (see ``storage.node_copy``); the adapter still
    names ``base_path``, the base the run was configured with, so every checkpoint of a run names one base.
    """
    from bioray.model import add_lora, load_base

    model = load_base(load_from or base_path, cfg, dtype=dtype)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if cfg.train.full_finetune:
        return model
    model = add_lora(model, cfg)
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = base_path
    return model


def _verified_checkpoint(checkpoint, cfg: Config, opened: ExitStack) -> Path:
    """The folder to resume from: Ray Train's latest checkpoint if its files verify, else the newest
    earlier one of the run that does (a corrupted or half-copied checkpoint costs some steps, not the run).

    Raises:
        CheckpointError: no checkpoint of the run verifies.
    """
    from bioray.storage import checkpoints, local_copy

    latest = Path(opened.enter_context(checkpoint.as_directory()))
    try:
        verify(latest)
        return latest
    except CheckpointError as e:
        bad = e
    # Its own name, not the local copy's (a download from object storage lands in a temporary folder).
    reported = Path(checkpoint.path).name
    for older in checkpoints(run_root(cfg.run.dir, cfg.run.storage, cfg.run.name)):
        if Path(older).name >= reported:  # step-NNNNNN names sort as their steps do
            continue
        folder = opened.enter_context(local_copy(older))
        try:
            verify(folder)
        except CheckpointError:
            continue
        log.warning("%s; resuming from %s instead, the newest checkpoint that verifies", bad, older)
        return folder
    raise bad


def _load_weights(model, directory: Path, cfg: Config) -> dict:
    """Loads the adapter (or full) weights of a checkpoint strictly; returns its trainer state.

    Strict: a weight the model has no place for, or a trainable weight the checkpoint lacks, is
    an error (a checkpoint of another LoRA shape or base must never load half-way).

    Raises:
        CheckpointError: naming the folder and the first key that does not fit.
    """
    from safetensors.torch import load_file

    state = json.loads((directory / STATE_FILE).read_text())
    if cfg.train.full_finetune:
        result = model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
        # Tied weights (the tiny base's lm_head is its embedding) are saved once, under one name.
        aliases = set(model.state_dict()) - set(dict(model.named_parameters())) - set(dict(model.named_buffers()))
        missing = [k for k in result.missing_keys if k not in aliases]
    else:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        missing = [k for k in result.missing_keys if k in trainable]
    bad = [f"unexpected weight {k}" for k in result.unexpected_keys] + [f"missing weight {k}" for k in missing]
    if bad:
        raise CheckpointError(f"{directory}: does not fit this model ({bad[0]}; {len(bad)} in all)")
    return state


def _load_training_state(engine, directory: Path, rank: int) -> None:
    """Optimizer moments and LR schedule (DeepSpeed's checkpoint) and this rank's random state.

    Raises:
        CheckpointError: the checkpoint has no resume state (made by bioray before 0.2), or none for this rank.
    """
    import torch
    from safetensors.torch import load_file

    resume = directory / RESUME_DIR
    rng = resume / rng_file(rank)
    if not (resume / DEEPSPEED_TAG).is_dir() or not rng.is_file():
        raise CheckpointError(f"{directory}: no resume state for rank {rank} in {RESUME_DIR}/ (a checkpoint of "
                              f"another world size, or made before bioray 0.2); start afresh with --fresh")
    # DeepSpeed's module states hold the trainable weights only (exclude_frozen_parameters): they
    # are the ones _load_weights already loaded strictly, so DeepSpeed need not check them again.
    path, _ = engine.load_checkpoint(str(resume), tag=DEEPSPEED_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"{resume}: DeepSpeed found no checkpoint to load")
    states = load_file(str(rng))
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _report_checkpoint(engine, cfg: Config, tokenizer, metrics: dict, rank: int, base_path: str,
                       validate: bool) -> None:
    """Saves a checkpoint and reports it; every rank writes its part into the same folder.

    Rank 0 writes the adapter (or model), tokenizer, ``bioray.yaml`` and ``trainer_state.json``;
    every rank writes its resume state (its ZeRO partition of the optimizer, its random state)
    under ``resume/``. Ray Train uploads each rank's files into the one checkpoint folder. With
    ``validate``, the report asks for scoring; its step travels with the request, so the scores
    are logged under the step of the checkpoint they belong to (``bioray.observe``).
    """
    import deepspeed
    import ray.train
    import torch
    from ray.train import Checkpoint
    from safetensors.torch import save_file

    from bioray._ray import ValidationTaskConfig

    full = cfg.train.full_finetune
    module = engine.module
    params = list(module.parameters()) if full else [p for p in module.parameters() if p.requires_grad]
    from bioray.tempdirs import prefix

    # Named for its process: a killed worker's half-written checkpoint is removed by the next job (bioray.cli).
    with tempfile.TemporaryDirectory(prefix=prefix("bioray-ckpt")) as tmp:
        # ZeRO-3 partitions parameters across ranks: gather them (a collective, so every rank
        # enters) before rank 0 saves, or the saved file holds empty tensors.
        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.train.zero_stage == 3 \
            else nullcontext()
        with gathered:
            if rank == 0:
                module.save_pretrained(tmp, safe_serialization=True)
        resume = Path(tmp, RESUME_DIR)
        # A collective too: each rank writes its own optimizer partition. Frozen base weights stay
        # out (they are the base model's), so a LoRA checkpoint grows by the adapter's optimizer state.
        engine.save_checkpoint(str(resume), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=not full)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(resume / rng_file(rank)))
        if rank == 0:
            tokenizer.save_pretrained(tmp)
            Path(tmp, CONFIG_FILE).write_text(dump(cfg))
            # base_model: what a full checkpoint was trained from (an adapter's config says it too);
            # micro_batches: the data position, each rank's micro-batches trained on so far.
            Path(tmp, STATE_FILE).write_text(json.dumps({
                "step": metrics["step"], "first_loss": metrics["first_loss"], "base_model": base_path,
                "micro_batches": metrics["step"] * cfg.train.grad_accum, "world_size": cfg.train.num_workers,
                "bioray_version": __version__}))
        # Last: what this rank wrote, with its sha256, verified by resume, evaluate and export.
        write_checksums(tmp, rank)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=step_dir_name(metrics["step"]),
                         validation=ValidationTaskConfig(fn_kwargs={"step": metrics["step"]}) if validate else False)


def fit(cfg: Config, base_path: str, train_ds, validation_fn=None, validation_kwargs: dict | None = None,
        metrics_log=None, tune_reports: bool = False, base_uri: str | None = None):
    """Runs ``TorchTrainer`` for one config and returns Ray Train's ``Result``.

    Args:
        cfg: The run's (or trial's) config.
        base_path: ``from_pretrained`` path of the base model.
        base_uri: A copy of a local ``base_path`` on run.storage, for workers on nodes that cannot see it.
        train_ds: The mixed, packed training Dataset (``bioray.data.training_dataset``).
        validation_fn: Scores a reported checkpoint (see ``bioray.evaluate.pool``); None = no scoring.
        validation_kwargs: JSON-serialisable keyword arguments for ``validation_fn``.
        metrics_log: A ``bioray.observe.MetricsLog`` actor; every report and every checkpoint's
            scores are sent to it (None = not logged).
        tune_reports: Inside a Tune trial: forward every report to Tune, with the latest task
            score from ``metrics_log`` (see ``bioray.observe.tune_report_callback``).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bioray._ray import ValidationConfig, ValidationTaskConfig
    from bioray.observe import LoggedValidation, ReportToLog, tune_report_callback

    # Mix, shuffle and pack once, before the workers hold their CPUs: on a small cluster the
    # shuffle tasks would otherwise wait forever for a CPU the training workers hold (Ray never
    # oversubscribes). The packed epoch then streams from the object store.
    t = cfg.train
    train_ds = train_ds.materialize()
    # One fixed shard per rank, split by rows here rather than streamed by Ray Train's split
    # coordinator (which hands blocks to whichever worker asks first): every rank then reads the
    # same rows in the same order in every epoch and after every restart, so a micro-batch's index
    # is its data position and a resumed run continues exactly. Equal rows per shard (rows are
    # packed sequences) keep every rank at the same number of micro-batches per epoch.
    shards = {shard_name(rank): ds for rank, ds in enumerate(train_ds.split(t.num_workers, equal=True))}
    for ds in shards.values():
        ds.context.enable_progress_bars = False  # rank 0's step lines are this stage's progress
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    scored = validation_fn is not None
    callbacks = [ReportToLog(metrics_log)] if metrics_log is not None else []
    if tune_reports:
        callbacks.append(tune_report_callback(metrics_log))
    run_config = RunConfig(
        # <run.dir>/checkpoints, or <run.storage>/<run name>/checkpoints: one folder per run and trial.
        name=CHECKPOINTS,
        storage_path=run_root(cfg.run.dir, cfg.run.storage, cfg.run.name),
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
        train_loop_config={"config": to_dict(cfg), "base_path": base_path, "base_uri": base_uri, "validate": scored,
                           # A bar where the driver has a terminal to draw it on; log lines elsewhere.
                           "progress_bar": sys.stdout.isatty() and not cfg.run.quiet and not tune_reports},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=run_config,
        datasets=shards,
        dataset_config=DataConfig(datasets_to_split=[]),  # already one per rank
        validation_config=validation_config,
    )
    return trainer.fit()
