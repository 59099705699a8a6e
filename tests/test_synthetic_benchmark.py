"""tools/synthetic_benchmark.py (`make demo`): the pairing of seeds, and the whole pipeline at toy
size, whose report must hold the AP values pycocotools computes from the evaluator's own output
files. Its statistics are dkd_det.evaluation's, tested in tests/test_evaluation.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from helpers import ROOT


def test_seed_pairs_variants_same_init_and_same_batches(tiny_data, dataset_opts, dkd_opts):
    """Seed k of the plain student and of DKD (which also builds a teacher, drawing from the
    same random generators) start from the same weights and see the same batches."""
    from dkd_det.data import register_coco_format
    from dkd_det.engine import Trainer

    from helpers import DKD_R18, make_cfg

    first = {}
    for kind in ("NONE", "DKD"):
        terms = "[]" if kind == "NONE" else f"['{kind}']"
        cfg = make_cfg(DKD_R18, *dkd_opts, *dataset_opts, "MODEL.DISTILL.TERMS", terms, "SEED", "7")
        register_coco_format(cfg)
        torch.manual_seed(7)
        trainer = Trainer(cfg)
        batches = iter(trainer.data_loader)
        files = [[x["file_name"] for x in next(batches)] for _ in range(3)]
        flips = [next(batches)[0]["image"].sum().item() for _ in range(2)]
        weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        first[kind] = (files, flips, weights)
    assert first["NONE"][0] == first["DKD"][0] and first["NONE"][1] == first["DKD"][1]
    plain_w, dkd_w = first["NONE"][2], first["DKD"][2]
    assert plain_w.keys() == dkd_w.keys()
    assert all(torch.equal(plain_w[k], dkd_w[k]) for k in plain_w)


def _run(out, *extra):
    return subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "synthetic_benchmark.py"),
            "--quick",
            "--seeds", "2",
            "--bootstrap", "10",
            "--output", str(out / "outputs"),
            "--data", str(out / "data"),
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )  # fmt: skip


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run = _run(out, "--reviewkd")
    assert run.returncode == 0, run.stdout[-4000:]
    return out, run.stdout


@pytest.mark.slow
def test_quick_demo_writes_report_plots_and_prints_the_seed_table(quick_demo):
    out, stdout = quick_demo
    for name in ("report.md", "report.json", "losses.png", "detections.png", "ap_per_seed.png"):
        assert os.path.getsize(out / "outputs" / name) > 0, name
    report = json.loads((out / "outputs" / "report.json").read_text())
    assert report["split"] == "test" and report["seeds"] == [0, 1]
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [
        (v, s) for s in (0, 1) for v in ("plain", "KD", "DKD", "DKD+ReviewKD")
    ]
    assert {"DKD+ReviewKD - DKD", "DKD+ReviewKD - plain"} <= set(report["differences"])
    for stage in (
        "1/6 data:",
        "2/6 pretrained ResNet-18",
        "3/6 training the teacher",
        "6/6 report",
    ):
        assert stage in stdout
    assert "| variant | seed 0 | seed 1 | mean | sd |" in stdout and "**Verdict.**" in stdout
    assert "| DKD - plain |" in stdout and "Evaluation noise (bootstrap" in stdout
    for v, stats in report["variants"].items():
        aps = [r["bbox"]["AP"] for r in report["runs"] if r["variant"] == v]
        assert stats["ap"] == aps and stats["mean"] == pytest.approx(sum(aps) / 2)
    d = report["differences"]["DKD - plain"]
    assert d["diffs"] == [
        a - b for a, b in zip(report["variants"]["DKD"]["ap"], report["variants"]["plain"]["ap"])
    ]
    assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert report["evaluation_noise"]["resamples"] == 10
    assert (
        report["cost"]["teacher R-50-FPN"]["parameters"]
        > report["cost"]["student R-18-FPN"]["parameters"]
    )


@pytest.mark.slow
def test_report_ap_is_what_pycocotools_computes_from_the_evaluator_files(quick_demo):
    out, _ = quick_demo
    report = json.loads((out / "outputs" / "report.json").read_text())
    gt = COCO(str(out / "data" / "test.json"))
    runs = report["runs"] + [{"bbox": report["teacher"]["bbox"], **report["teacher"]}]
    evaluated = 0
    for r in runs:
        detections = json.loads(open(r["evaluator_output"]).read())
        if not detections:  # a toy model may detect nothing: COCO AP is then 0
            assert r["bbox"]["AP"] == 0.0
            continue
        ev = COCOeval(gt, gt.loadRes(detections), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert r["bbox"]["AP"] == pytest.approx(100 * ev.stats[0], abs=1e-6)
        assert r["bbox"]["AP50"] == pytest.approx(100 * ev.stats[1], abs=1e-6)
        evaluated += 1
    assert evaluated > 0


@pytest.mark.slow
def test_rerun_reuses_data_backbones_and_teacher(quick_demo):
    out, _ = quick_demo
    run = _run(out, "--seeds", "1", "--bootstrap", "0")
    assert run.returncode == 0, run.stdout[-4000:]
    for reused in ("data: reusing", "pretrained ResNet-18: reusing", "teacher: reusing"):
        assert reused in run.stdout
    assert "with one seed: no interval, no conclusion" in run.stdout
