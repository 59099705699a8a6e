"""tools/benchmark.py keeps working: a toy-size run prints the table and writes the JSON.
(No timing is asserted: these machines are noisy.)"""

import json

import pytest

from helpers import load_tool, run_tool


@pytest.mark.slow
def test_toy_benchmark_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    run = run_tool("benchmark.py", "--toy", "--pairs", "R101-R18", "--output", str(out))
    assert run.returncode == 0, run.stdout[-3000:]
    assert (
        "| pair | plain step ms | KD step ms | DKD step ms | DKD+ReviewKD step ms "
        "| DKD+ReviewKD/DKD | teacher fwd ms |" in run.stdout
    )
    assert "| R101-R18 |" in run.stdout and "| ratio |" in run.stdout
    report = json.loads(out.read_text())
    r = report["pairs"]["R101-R18"]
    for key in (
        "plain_step_ms",
        "kd_step_ms",
        "dkd_step_ms",
        "reviewdkd_step_ms",
        "reviewdkd_step_mib",
        "teacher_forward_ms",
        "student_inference_ms",
        "teacher_inference_ms",
    ):
        assert r[key] > 0, key
    assert r["dkd_over_plain_plus_teacher"] == r["dkd_step_ms"] / (
        r["plain_step_ms"] + r["teacher_forward_ms"]
    )
    assert r["reviewdkd_over_dkd"] == r["reviewdkd_step_ms"] / r["dkd_step_ms"]
    assert report["loss"]["naive_mib"] > 0 and report["loss"]["dkd_loss_mib"] > 0


def test_naive_formulation_agrees_with_dkd_loss_where_it_is_finite():
    """The benchmark's baseline computes the same loss (so the comparison is fair)."""
    import torch

    from dkd_det.losses import dkd_loss

    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(256, 81, generator=g) * 2, torch.randn(256, 81, generator=g) * 2
    t = torch.randint(0, 81, (256,), generator=g)
    naive_dkd_loss = load_tool("benchmark.py").naive_dkd_loss
    torch.testing.assert_close(
        naive_dkd_loss(z_s, z_t, t, 1.0, 8.0, 2.0),
        dkd_loss(z_s, z_t, t, 1.0, 8.0, 2.0),
        rtol=1e-4,
        atol=1e-5,
    )
