"""`make demo QUICK=1`'s entry point: the whole pipeline at toy size, and a report whose
AP values are the ones pycocotools computes from the evaluator's own output files."""

import json
import os
import subprocess
import sys

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from helpers import ROOT

# Every test here starts processes.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "synthetic_benchmark.py"),
            "--quick",
            "--output",
            str(out / "outputs"),
            "--data",
            str(out / "data"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    return out, run.stdout


def test_quick_demo_writes_the_four_files_and_prints_the_table(quick_demo):
    out, stdout = quick_demo
    for name in ("report.md", "report.json", "losses.png", "detections.png"):
        assert os.path.getsize(out / "outputs" / name) > 0, name
    report = json.loads((out / "outputs" / "report.json").read_text())
    assert [m["model"] for m in report["models"]] == [
        "teacher R-50-FPN",
        "student R-18-FPN",
        "KD R-50 -> R-18",
        "DKD R-50 -> R-18",
    ]
    assert "| model | parameters | AP |" in stdout  # the table is printed at the end
    for stage in (
        "data:",
        "training teacher R-50-FPN",
        "training DKD R-50 -> R-18",
        "timing inference",
    ):
        assert stage in stdout
    teacher, student = report["models"][0], report["models"][1]
    assert teacher["parameters"] > student["parameters"]
    assert all(m["train_s_per_iter"] > 0 and m["inference_ms"] > 0 for m in report["models"])


def test_report_ap_is_what_pycocotools_computes_from_the_evaluator_files(quick_demo):
    out, _ = quick_demo
    report = json.loads((out / "outputs" / "report.json").read_text())
    gt = COCO(str(out / "data" / "val.json"))
    for m in report["models"]:
        detections = json.loads(open(m["evaluator_output"]).read())
        if not detections:  # a toy model may detect nothing: COCO AP is then 0
            assert m["AP"] == 0.0
            continue
        ev = COCOeval(gt, gt.loadRes(detections), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert m["AP"] == pytest.approx(100 * ev.stats[0], abs=1e-6), m["model"]
        assert m["AP50"] == pytest.approx(100 * ev.stats[1], abs=1e-6)


def test_teacher_is_reused_on_a_second_run(quick_demo):
    out, _ = quick_demo
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "synthetic_benchmark.py"),
            "--quick",
            "--output",
            str(out / "outputs"),
            "--data",
            str(out / "data"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert "data: reusing" in run.stdout and "teacher R-50-FPN: reusing" in run.stdout
