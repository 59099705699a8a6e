"""dkd_det.engine's Trainer and tools/train_net.py as users run them: train, evaluate,
resume, SIGKILL and resume, and no collective on a rank that failed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.data import MetadataCatalog

from dkd_det.engine import Trainer

from helpers import DKD_R18, R18, ROOT, TINY, make_cfg, run_tool, train_net_here


@pytest.mark.slow
def test_sigkill_then_resume_finishes_the_schedule(tmp_path, dkd_opts, dataset_opts):
    """Kill -9 a run after a checkpoint, resume: it continues from that checkpoint (nothing
    repeated beyond one checkpoint interval) with its learning-rate schedule, to MAX_ITER."""
    out = tmp_path / "out"
    opts = (
        TINY
        + dkd_opts
        + dataset_opts
        + [
            "OUTPUT_DIR",
            str(out),
            "SOLVER.MAX_ITER",
            "24",
            "SOLVER.CHECKPOINT_PERIOD",
            "4",
            "SOLVER.STEPS",
            "(12,)",
            "TEST.EVAL_PERIOD",
            "0",
            "DATASETS.TEST",
            "()",
        ]
    )
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", DKD_R18]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd + opts, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while (
        not (out / "model_0000007.pth").exists() and proc.poll() is None and time.time() < deadline
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    tagged = (out / "last_checkpoint").read_text()
    killed_at = int(torch.load(out / tagged)["iteration"])
    assert killed_at >= 3 and not (out / "model_final.pth").exists()

    run = subprocess.run(
        cmd[:2] + ["--resume"] + cmd[2:] + opts,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert f"Starting training from iteration {killed_at + 1}" in run.stdout
    final = torch.load(out / "model_final.pth")
    assert final["iteration"] == 23
    # The scheduler continued: the lr decayed at iteration 12 as in an uninterrupted run.
    state = final["trainer"]
    assert state["hooks"]["LRScheduler"]["last_epoch"] == 24
    assert state["_trainer"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.002 * 0.1)
    assert state["_trainer"]["optimizer"]["state"]  # momentum buffers were kept and saved
    with open(out / "metrics.json") as f:
        lrs = {r["iteration"]: r["lr"] for r in map(json.loads, f) if "lr" in r}
    assert lrs[23] == pytest.approx(0.0002)


# ---------------------------------------------------------------------------------------------
# A failure on one rank: no collective in the teacher check, the final evaluation not pre-empted


def _trainer_with_recorded_collectives(monkeypatch, tmp_path, opts, fail_at=None, touch=False):
    """A tiny Trainer whose steps do nothing (or raise at iteration ``fail_at``, or change the
    teacher), with its all_gathers and final evaluations recorded."""
    from detectron2.utils import comm

    from dkd_det.data import register_coco_format

    cfg = make_cfg(
        DKD_R18, *opts, "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "0"
    )
    register_coco_format(cfg)
    trainer = Trainer(cfg)
    calls = {"all_gather": [], "eval": []}

    def all_gather(data, group=None):
        # On GPUs a rank alone in a collective blocks for the process-group timeout (30 min).
        calls["all_gather"].append(data)
        return [data]

    def step():
        if trainer.iter == fail_at:
            raise RuntimeError("CUDA out of memory (simulated, on this rank only)")
        if touch:
            with torch.no_grad():
                next(trainer.model.teacher.parameters()).add_(1.0)

    monkeypatch.setattr(comm, "all_gather", all_gather)
    monkeypatch.setattr(trainer, "run_step", step)
    monkeypatch.setattr(
        Trainer, "test", classmethod(lambda cls, cfg, model, ev=None: calls["eval"].append(1) or {})
    )
    return trainer, calls


def test_teacher_check_runs_no_collective_after_an_exception(
    monkeypatch, tmp_path, dkd_opts, dataset_opts
):
    """An exception short of the last iteration, on one rank: that rank's teacher check skips
    its all_gather (the other ranks wait in DDP's all-reduce, NCCL would block until its
    timeout), and the original error is what propagates."""
    from detectron2.engine.hooks import EvalHook

    from dkd_det.engine import TeacherCheck

    trainer, calls = _trainer_with_recorded_collectives(
        monkeypatch, tmp_path, dkd_opts + dataset_opts, fail_at=1
    )
    kinds = [type(h) for h in trainer._hooks]
    assert kinds[-1] is TeacherCheck and kinds.index(EvalHook) < kinds.index(TeacherCheck)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train()
    assert calls["all_gather"] == []
    assert calls["eval"] == []  # detectron2's EvalHook: no final evaluation after a failure


def test_exception_in_the_last_iteration_still_runs_no_teacher_collective(
    monkeypatch, tmp_path, dkd_opts, dataset_opts
):
    """The guard is stricter than EvalHook's (iter + 1 >= max_iter): the last iteration failed
    on this rank, so the others may still be in its all-reduce."""
    trainer, calls = _trainer_with_recorded_collectives(
        monkeypatch, tmp_path, dkd_opts + dataset_opts, fail_at=3
    )
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train()
    assert calls["all_gather"] == []


def test_changed_teacher_is_reported_after_the_final_evaluation(
    monkeypatch, tmp_path, dkd_opts, dataset_opts
):
    trainer, calls = _trainer_with_recorded_collectives(
        monkeypatch, tmp_path, dkd_opts + dataset_opts, touch=True
    )
    with pytest.raises(RuntimeError, match="The teacher changed during training"):
        trainer.train()
    assert calls["eval"] == [1]  # the final evaluation ran before the check raised
    assert len(calls["all_gather"]) == 1  # the check gathered once, on every rank alike


def test_batched_evaluation_finds_the_same_detections(tmp_path, dataset_opts):
    """TEST.IMS_PER_BATCH 3 evaluates 4 same-sized images in batches of 3 and 1: the same
    detections (scores to float precision) and the same AP as one image at a time."""
    from detectron2.modeling import build_model

    from dkd_det.data import register_coco_format

    # every proposal kept, so that a random student has detections to compare
    cfg = make_cfg(R18, *dataset_opts, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    register_coco_format(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    detections, aps = {}, {}
    for n in (1, 3):
        c = cfg.clone()
        c.defrost()
        c.TEST.IMS_PER_BATCH, c.OUTPUT_DIR = n, str(tmp_path / str(n))
        sizes = [len(b) for b in Trainer.build_test_loader(c, "tiny_val")]
        assert sizes == ([1] * 4 if n == 1 else [3, 1])
        aps[n] = Trainer.test(c, model)["bbox"]
        path = tmp_path / str(n) / "inference" / "tiny_val" / "coco_instances_results.json"
        detections[n] = json.loads(path.read_text())
    one, batched = detections[1], detections[3]
    assert len(one) == len(batched) > 100
    assert [(d["image_id"], d["category_id"]) for d in one] == [
        (d["image_id"], d["category_id"]) for d in batched
    ]
    assert [d["score"] for d in batched] == pytest.approx([d["score"] for d in one], abs=1e-5)
    boxes = [[x for d in dets for x in d["bbox"]] for dets in (one, batched)]
    assert boxes[1] == pytest.approx(boxes[0], abs=1e-3)  # pixels
    assert aps[3] == pytest.approx(aps[1], abs=1e-6, nan_ok=True)


TRAIN = ["--config-file", DKD_R18]


def last_training_metrics(output_dir):
    """The last metrics.json record written by a training iteration (not by evaluation)."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [r for r in map(json.loads, f) if "total_loss" in r][-1]


@pytest.mark.slow
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


@pytest.mark.slow
def test_plain_student_config_trains(tmp_path, dataset_opts):
    out = str(tmp_path / "plain")
    train_net_here(
        "--config-file", R18, *TINY, *dataset_opts, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "2"
    )
    assert "loss_dkd" not in last_training_metrics(out)


@pytest.mark.slow
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


@pytest.mark.slow
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
