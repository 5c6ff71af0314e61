"""Optimizer and learning-rate schedule, shared by fine-tuning (``bioray.train``) and the tiny
base's pretraining (``bioray.model``).

The schedule is transformers' own warmup + cosine (the one its ``Trainer`` uses, and with it
Axolotl and LLaMA-Factory): linear warmup from 0, then cosine decay to ``MIN_LR_RATE`` of the
peak at the last step.
"""

from __future__ import annotations

import torch

MIN_LR_RATE = 0.1  # the cosine ends at 10% of the peak learning rate


def adamw(params, lr: float, weight_decay: float, offload: bool = False) -> torch.optim.Optimizer:
    """torch's AdamW, or DeepSpeed's CPU Adam where ZeRO offloads the optimizer to CPU memory."""
    params = list(params)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, start_step: int = 0):
    """Warmup + cosine to ``MIN_LR_RATE``; ``start_step`` > 0 resumes the schedule where a run stopped.

    The first optimizer step after the call uses the factor of ``start_step``.
    """
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    for group in optimizer.param_groups:
        # What torch's schedulers read when they start at a later step (last_epoch >= 0).
        group.setdefault("initial_lr", group["lr"])
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps,
                                                       min_lr_rate=MIN_LR_RATE, last_epoch=start_step - 1)
