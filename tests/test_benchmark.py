"""tools/benchmark.py and tools/benchmark_deploy.py keep working: toy-size runs print their
tables with spreads and write the JSON; an export that fails its check fails the deploy
benchmark instead of becoming an "n/a" row. (No timing is asserted: these machines are noisy.)"""

import argparse
import json
import sys

import pytest

from helpers import load_tool, run_tool


def _ordered(s):
    return s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]


@pytest.mark.slow
def test_toy_benchmark_prints_tables_with_spreads_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    run = run_tool("benchmark.py", "--toy", "--pairs", "R101-R18", "--output", str(out))
    assert run.returncode == 0, run.stdout[-3000:]
    assert (
        "| pair | plain step ms | KD step ms | DKD step ms | DKD+ReviewKD step ms "
        "| teacher fwd ms | student infer ms | teacher infer ms |" in run.stdout
    )
    assert "| pair | DKD/plain | DKD/(plain+teacher) |" in run.stdout
    assert "| R101-R18 |" in run.stdout and "| ratio |" in run.stdout
    report = json.loads(out.read_text())
    r = report["pairs"]["R101-R18"]
    rounds = report["settings"]["iters"]
    for key, s in r["ms"].items():
        assert s["n"] == rounds and s["min"] > 0 and _ordered(s), key
    for key in ("plain_step", "dkd_step", "reviewdkd_step", "teacher_forward"):
        assert r["mib"][key] > 0, key
    for key in ("DKD/plain", "DKD/(plain+teacher)", "teacher/student infer"):
        assert _ordered(r["ratios"][key]) and r["ratios"][key]["n"] == rounds, key
    # The teacher's forward ran on the boxes the DKD student sampled: ROIs x images.
    assert r["boxes"] == report["settings"]["rois"] * report["settings"]["batch"]
    # Inference on equal footing: the same proposals and NMS candidates for both models.
    student, teacher = r["inference"]["student"], r["inference"]["teacher"]
    assert student["proposals"] == teacher["proposals"] > 0
    assert student["candidates"] == teacher["candidates"] == report["settings"]["candidates"]
    assert _ordered(report["loss"]["time_ratio"]) and report["loss"]["mib"]["naive"] > 0


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


@pytest.mark.slow
def test_toy_deploy_benchmark_reports_every_runtime(tmp_path):
    out = tmp_path / "bench.json"
    run = run_tool("benchmark_deploy.py", "--toy", "--pairs", "R101-R18", "--output", str(out))
    assert run.returncode == 0, run.stdout[-3000:]
    assert "| model | runtime | ms | speed-up vs teacher | peak MiB |" in run.stdout
    result = json.loads(out.read_text())["deploy"]["R101-R18"]
    rows = result["rows"]
    assert [r["runtime"] for r in rows[:3]] == ["PyTorch", "PyTorch", "TorchScript (trace)"]
    for r in rows[:3]:  # PyTorch and TorchScript need no extra: always measured
        assert r["ms"]["median"] > 0 and _ordered(r["ms"]) and _ordered(r["speedup"]), r
    assert rows[0]["speedup"]["median"] == 1.0
    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # the one row that may be "n/a": the optional extra is missing
        assert rows[3]["ms"] is None and "dkd_det[deploy]" in rows[3]["note"]
    else:
        assert rows[3]["runtime"] == "ONNX Runtime (opset 17)" and rows[3]["ms"]["median"] > 0
    teacher, student = result["inference"]["teacher"], result["inference"]["student"]
    assert teacher["proposals"] == student["proposals"] > 0
    assert teacher["candidates"] == student["candidates"] > 0


def test_an_export_that_fails_its_check_fails_the_deploy_benchmark(tmp_path, monkeypatch):
    from dkd_det.export import DeployCheckError

    tool = load_tool("benchmark_deploy.py")

    def failing_export(cfg, model, folder, fmt, images, **kwargs):
        raise DeployCheckError(f"the {fmt} export does not reproduce the PyTorch student")

    monkeypatch.setattr(tool, "export_deployable", failing_export)
    with pytest.raises(DeployCheckError, match="torchscript export does not reproduce"):
        args = argparse.Namespace(device="cpu", toy=True, size=64, candidates=50, iters=1, warmup=0)
        tool.benchmark_deploy("R101-R18", args, str(tmp_path))


def test_only_a_missing_onnx_extra_makes_a_runtime_unavailable(monkeypatch):
    tool = load_tool("benchmark_deploy.py")
    assert tool.unavailable("torchscript", "cpu") is None
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # "not importable"
    note = tool.unavailable("onnx", "cpu")
    assert "dkd_det[deploy]" in note and "onnxruntime" in note
    assert tool.unavailable("torchscript", "cpu") is None
