"""The GPU benchmark script (benchmarks/gpu_throughput.py) runs end to end on CPU with a tiny shape.

No GPU is needed: this keeps the script from rotting while none is lent. The numbers it writes
here mean nothing; the fields and their consistency are what is checked.
"""

import json

from conftest import run_job


def test_gpu_script_tiny_run_writes_its_json(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_job("benchmarks/gpu_throughput.py", "--tiny", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tiny"] is True and result["measured_on_gpu"] is False
    assert set(result) >= {"device", "shape", "dtype", "seq_len", "lora", "flops_formula", "peak_flops", "configs",
                           "best", "target", "published", "wall_s"}
    assert result["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]
    # Both gradient-checkpointing settings ran, each for the asked steps, and trained.
    assert [(c["attn_implementation"], c["gradient_checkpointing"]) for c in result["configs"]] == [
        ("sdpa", False), ("sdpa", True)]
    for c in result["configs"]:
        assert "error" not in c, c
        assert len(c["step_seconds"]) == result["warmup_steps"] + result["timed_steps"]
        assert c["tokens_per_s"] > 0 and c["model_tflops_per_s"] > 0
        assert 0 < c["non_pad_fraction"] <= 1
        # Logits only at answer positions: about half the tokens (--answer-share 0.5), never all.
        assert 0 < c["answer_positions_per_step"] < c["real_tokens_per_step"]
        assert c["params"]["lora"] > 0 and c["params"]["all"] > c["params"]["body_linear"] + c["params"]["lm_head"]
        assert c["first_loss"] == c["first_loss"]  # not NaN
    # Same seed, same data: checkpointing recomputes, it does not change the arithmetic.
    a, b = result["configs"]
    assert abs(a["first_loss"] - b["first_loss"]) < 1e-5
    # No peak FLOPs for a CPU: no MFU claimed.
    assert result["peak_flops"] is None and result["best"]["mfu"] is None and result["target"]["met"] is None
