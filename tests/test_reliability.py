"""Reliability: crash and resume, atomic checkpoints, numerical safety, bad data."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from dkd_det.checkpoint import AtomicCheckpointer
from dkd_det.engine import Trainer

from helpers import DKD_R18, ROOT, TINY, make_cfg


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


def test_last_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    """A write interrupted before the rename leaves the previous tag intact."""
    model = torch.nn.Linear(2, 2)
    ckpt = AtomicCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001")
    assert ckpt.get_checkpoint_file().endswith("model_0000001.pth")

    def killed(*args):
        raise KeyboardInterrupt("killed between the write and the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000002")
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert ckpt.get_checkpoint_file().endswith("model_0000001.pth")


def test_trainer_uses_the_atomic_checkpointer(dkd_opts, dataset_opts, tmp_path):
    cfg = make_cfg(DKD_R18, *dkd_opts, *dataset_opts, "OUTPUT_DIR", str(tmp_path))
    from dkd_det.data import register_coco_format

    register_coco_format(cfg)
    trainer = Trainer(cfg)
    assert isinstance(trainer.checkpointer, AtomicCheckpointer)
    # A NaN from the student stops training with detectron2's FloatingPointError.
    with torch.no_grad():
        trainer.model.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))
    trainer.iter = trainer.start_iter = 0
    with EventStorage(0) as trainer.storage:
        with pytest.raises(FloatingPointError, match="NaN"):
            trainer.run_step()


def test_image_without_boxes_and_batch_without_proposals(dkd_opts):
    model = build_model(make_cfg(DKD_R18, *dkd_opts))
    model.train()
    empty = Instances(
        (96, 96), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long)
    )
    with EventStorage(0):
        losses = model([{"image": torch.rand(3, 96, 96) * 255, "instances": empty}] * 2)
        assert all(torch.isfinite(v) for v in losses.values()) and "loss_dkd" in losses
        sum(losses.values()).backward()
        # No proposals and no ground truth at all: the ROI heads see zero regions.
        images = ImageList.from_tensors([torch.zeros(3, 96, 96)], 32)
        features = model.backbone(images.tensor)
        no_props = Instances(
            (96, 96), proposal_boxes=Boxes(torch.zeros(0, 4)), objectness_logits=torch.zeros(0)
        )
        _, losses = model.roi_heads(
            images, features, [no_props], [empty], teacher_logits=lambda boxes: torch.zeros(0, 4)
        )
    assert losses["loss_dkd"].item() == 0.0 and torch.isfinite(losses["loss_cls"])


def test_custom_dataset_files_missing_are_named(tmp_path, tiny_data):
    from dkd_det.data import check_datasets, register_coco_format

    json_file, image_root = tiny_data["train"]
    for name, j, r, missing in (
        ("no_json", str(tmp_path / "nope.json"), image_root, "nope.json"),
        ("no_root", json_file, str(tmp_path / "noimages"), "noimages"),
    ):
        cfg = make_cfg(
            DKD_R18,
            "DATASETS.COCO_FORMAT",
            repr([(name, j, r)]),
            "DATASETS.TRAIN",
            repr((name,)),
            "DATASETS.TEST",
            "()",
        )
        register_coco_format(cfg)
        with pytest.raises(FileNotFoundError, match=missing):
            check_datasets(cfg)


def test_image_listed_but_missing_on_disk(tmp_path, tiny_data, dkd_opts):
    import shutil

    json_file, image_root = tiny_data["train"]
    root = tmp_path / "images"
    shutil.copytree(image_root, root)
    os.remove(root / "000003.png")
    cfg = make_cfg(
        DKD_R18,
        *dkd_opts,
        "DATASETS.COCO_FORMAT",
        repr([("one_missing", json_file, str(root))]),
        "DATASETS.TRAIN",
        "('one_missing',)",
        "DATASETS.TEST",
        "()",
    )
    from dkd_det.data import register_coco_format

    register_coco_format(cfg)
    with pytest.raises(
        FileNotFoundError, match=r"1 of 8 images .* missing, e.g. \['.*000003.png'\]"
    ):
        Trainer.build_train_loader(cfg)
