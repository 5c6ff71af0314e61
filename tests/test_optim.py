"""The one learning-rate schedule: warmup from 1/warmup of the peak, cosine to 10%, resumable."""

import math

import pytest
import torch

from bioray.optim import MIN_LR_RATE, lr_factor, lr_schedule


def _lrs(warmup, total, start=0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = lr_schedule(opt, warmup, total, start)
    out = []
    for _ in range(total - start):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_a_tenth():
    lrs = _lrs(10, 120)
    assert lrs[0] == pytest.approx(2.0 / 10)  # the first step trains (transformers' warmup starts at 0)
    assert lrs[9] == pytest.approx(2.0) and max(lrs) == pytest.approx(2.0)
    assert lrs[-1] == pytest.approx(2.0 * (MIN_LR_RATE + (1 - MIN_LR_RATE) * 0.5 * (1 + math.cos(math.pi * 109 / 110))))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_factor(500, 10, 120) == pytest.approx(MIN_LR_RATE)  # past the end it stays at the floor


def test_a_resumed_schedule_continues_where_it_stopped():
    assert _lrs(10, 120, start=47) == _lrs(10, 120)[47:]
