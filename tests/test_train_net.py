"""End-to-end: tools/train_net.py as users run it, on a tiny COCO-format dataset."""

import json
import os

import pytest
import torch
from detectron2.data import MetadataCatalog

from helpers import DKD_R18, R18, TINY, make_cfg, run_tool

# Every test here starts processes.
pytestmark = pytest.mark.slow

TRAIN = ["--config-file", DKD_R18]


def last_training_metrics(output_dir):
    """The last metrics.json record written by a training iteration (not by evaluation)."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [r for r in map(json.loads, f) if "total_loss" in r][-1]


def test_train_evaluate_resume(tmp_path, dkd_opts, dataset_opts):
    out = str(tmp_path / "out")
    common = TINY + dkd_opts + dataset_opts + ["OUTPUT_DIR", out, "SOLVER.CHECKPOINT_PERIOD", "2"]
    run = run_tool("train_net.py", *TRAIN, *common, "SOLVER.MAX_ITER", "4")
    assert run.returncode == 0, run.stdout[-3000:]
    last = last_training_metrics(out)
    assert last["iteration"] == 3
    assert {"loss_dkd", "dkd/tckd", "dkd/nckd", "loss_cls", "loss_box_reg"} <= set(last)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))  # TensorBoard
    state = torch.load(os.path.join(out, "model_final.pth"))
    assert state["iteration"] == 3
    assert not any("teacher" in k for k in state["model"])

    # Evaluation is the student alone: it never needs the teacher's weights.
    ev = run_tool(
        "train_net.py",
        "--eval-only",
        *TRAIN,
        *common,
        "MODEL.WEIGHTS",
        os.path.join(out, "model_final.pth"),
        "MODEL.TEACHER.WEIGHTS",
        "/no/teacher.pth",
    )
    assert ev.returncode == 0, ev.stdout[-3000:]
    assert "Evaluation results for bbox" in ev.stdout
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in ev.stdout
    assert os.path.isfile(os.path.join(out, "inference", "tiny_val", "coco_instances_results.json"))

    # --resume continues from the last checkpoint (iteration 3) to the new MAX_ITER.
    res = run_tool("train_net.py", "--resume", *TRAIN, *common, "SOLVER.MAX_ITER", "6")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "Starting training from iteration 4" in res.stdout
    assert last_training_metrics(out)["iteration"] == 5
    assert torch.load(os.path.join(out, "model_final.pth"))["iteration"] == 5


def test_plain_student_config_trains(tmp_path, dataset_opts):
    out = str(tmp_path / "plain")
    run = run_tool(
        "train_net.py",
        "--config-file",
        R18,
        *TINY,
        *dataset_opts,
        "OUTPUT_DIR",
        out,
        "SOLVER.MAX_ITER",
        "2",
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert "loss_dkd" not in last_training_metrics(out)


def test_missing_builtin_coco_names_the_expected_path(tmp_path, dkd_opts):
    run = run_tool(
        "train_net.py",
        *TRAIN,
        *TINY,
        *dkd_opts,
        "OUTPUT_DIR",
        str(tmp_path),
        env={"DETECTRON2_DATASETS": str(tmp_path / "nowhere")},
    )
    assert run.returncode != 0
    assert f"{tmp_path}/nowhere/coco/annotations/instances_train2017.json" in run.stdout
    assert "DETECTRON2_DATASETS" in run.stdout


def test_dataset_class_count_must_match_the_student(dkd_opts, dataset_opts, tmp_path):
    from dkd_det.data import register_coco_format
    from dkd_det.engine import Trainer

    cfg = make_cfg(DKD_R18, *dkd_opts, *dataset_opts, "MODEL.ROI_HEADS.NUM_CLASSES", "4")
    register_coco_format(cfg)
    with pytest.raises(
        ValueError, match="'tiny_train' has 3 classes but MODEL.ROI_HEADS.NUM_CLASSES is 4"
    ):
        Trainer.build_train_loader(cfg)
    assert MetadataCatalog.get("tiny_train").thing_classes[0] == "red-square"
