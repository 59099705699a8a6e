"""tools/synthetic_benchmark.py (`make demo`): the pairing of seeds, and the whole pipeline at toy
size: the comparison of tools/compare.py (tested on a user's dataset in tests/test_compare.py) on
the synthetic world. Its statistics are dkd_det.evaluation's, tested in test_evaluation.py."""

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


def _run(out, *extra, output="outputs"):
    return subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "synthetic_benchmark.py"),
            "--quick",
            "--seeds", "2",
            "--bootstrap", "10",
            "--output", str(out / output),
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
    run = _run(
        out, "--variants", "plain", "dkd+reviewkd", "--reference", "dkd+reviewkd", "--jobs", "2"
    )
    assert run.returncode == 0, run.stdout[-4000:]
    return out, run.stdout


@pytest.mark.slow
def test_quick_demo_is_the_comparison_on_the_synthetic_world(quick_demo):
    out, stdout = quick_demo
    for name in ("report.md", "report.json", "losses.png", "detections.png", "ap_per_seed.png"):
        assert os.path.getsize(out / "outputs" / name) > 0, name
    report = json.loads((out / "outputs" / "report.json").read_text())
    assert report["split"] == "test" and report["seeds"] == [0, 1]
    assert report["regime"] == "scratch"
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [
        (v, s) for s in (0, 1) for v in ("plain", "DKD+REVIEWKD")
    ]
    assert set(report["tasks"]["bbox"]["differences"]) == {"DKD+REVIEWKD - plain"}
    for stage in ("1/3 data:", "2/3 pretrained ResNet-18", "3/3 comparison"):
        assert stage in stdout
    assert "pretrained ResNet-50" not in stdout  # the scratch regime's teacher is an R-18
    # the plain students train beside the teacher; the distilled ones wait for its weights
    started = {(r["variant"], r["seed"]): os.path.getmtime(f"{r['output_dir']}/run_config.yaml")
               for r in report["runs"]}  # fmt: skip
    teacher_done = os.path.getmtime(out / "outputs" / "teacher" / "result.json")
    assert started["plain", 0] < teacher_done
    assert all(t >= teacher_done for (v, _), t in started.items() if v != "plain")
    assert (
        "| variant | seed 0 | seed 1 | mean | sd |" in stdout and "**Verdict (box AP).**" in stdout
    )
    assert "Evaluation noise (bootstrap" in stdout
    # every student and the teacher evaluated on the 8 test images of the quick world
    assert report["num_eval_images"] == 8 and report["teacher"]["metrics"]["bbox"]["AP"] >= 0
    gt = COCO(str(out / "data" / "test.json"))
    for r in report["runs"][:1]:  # the numbers are pycocotools' (tests/test_compare.py: all)
        detections = json.loads(open(r["evaluator_output"]).read())
        if detections:
            ev = COCOeval(gt, gt.loadRes(detections), "bbox")
            ev.evaluate(), ev.accumulate(), ev.summarize()
            assert r["metrics"]["bbox"]["AP"] == pytest.approx(100 * ev.stats[0], abs=1e-6)


@pytest.mark.slow
def test_rerun_reuses_data_backbones_teacher_and_runs(quick_demo):
    out, _ = quick_demo
    run = _run(out, "--seeds", "1", "--bootstrap", "0", "--variants", "plain", "dkd+reviewkd")
    assert run.returncode == 0, run.stdout[-4000:]
    for reused in ("data: reusing", "pretrained ResNet-18: reusing", "reusing 3 finished run"):
        assert reused in run.stdout
    assert "with one seed: no interval, no conclusion" in run.stdout


@pytest.mark.slow
def test_quick_mask_demo_reports_box_and_mask_ap(quick_demo):
    out, _ = quick_demo  # its data (with masks) are reused; the Mask R-CNN teacher is an R-50
    run = _run(out, "--mask", "--bootstrap", "0", output="mask")
    assert run.returncode == 0, run.stdout[-4000:]
    assert "data: reusing" in run.stdout and "2/3 pretrained ResNet-50 on" in run.stdout
    report = json.loads((out / "mask" / "report.json").read_text())
    assert list(report["tasks"]) == ["bbox", "segm"]
    assert {r["variant"] for r in report["runs"]} == {"plain", "DKD"}
    for task in ("bbox", "segm"):
        assert set(report["tasks"][task]["differences"]) == {"DKD - plain"}
        assert "segm" in report["teacher"]["metrics"]
    assert "COCO mask AP (percent)" in run.stdout and "**Verdict (mask AP).**" in run.stdout
    assert os.path.getsize(out / "mask" / "ap_per_seed_segm.png") > 0
