"""Reliability: crash and resume, atomic checkpoints, numerical safety, bad data, bad weight
files, heads DKD cannot distil, and no collective on a rank that failed."""

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
from dkd_det.distill import DistillInputs
from dkd_det.engine import Trainer

from helpers import DKD_R18, R18, ROOT, TEACHER_OPTS, TINY, make_cfg, save_random_model


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
        sampled, losses = model.roi_heads(images, features, [no_props], [empty])
        assert sampled[0].class_logits.shape == (0, 4)
        inputs = DistillInputs(
            images,
            features,
            features,
            [empty],
            gt_classes=sampled[0].gt_classes,
            student_logits=sampled[0].class_logits,
            teacher_logits=torch.zeros(0, 4),
        )
        losses.update(model.distill_terms["dkd"](inputs))
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
        FileNotFoundError,
        match=r"1 of 8 images .* \(1 missing, 0 broken\).*'.*000003.png' \(missing\)",
    ):
        Trainer.build_train_loader(cfg)


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


# ---------------------------------------------------------------------------------------------
# Images: checked before training (train and test sets), named when the loader meets one later


def _jpeg_copy(tiny_data, split, root):
    """The split's dataset with its images re-encoded as JPEG under ``root``: (json, root)."""
    import cv2

    json_file, image_root = tiny_data[split]
    with open(json_file) as f:
        coco = json.load(f)
    os.makedirs(root, exist_ok=True)
    for image in coco["images"]:
        name = image["file_name"].replace(".png", ".jpg")
        cv2.imwrite(
            os.path.join(root, name), cv2.imread(os.path.join(image_root, image["file_name"]))
        )
        image["file_name"] = name
    out = os.path.join(root, f"{split}.json")
    with open(out, "w") as f:
        json.dump(coco, f)
    return out, str(root)


def _truncate(path, keep=0.6):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _captured(name):
    """A list that receives the messages of logger ``name`` (caplog misses loggers that
    detectron2's setup_logger set not to propagate)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger(name).addHandler(handler)
    return records, lambda: logging.getLogger(name).removeHandler(handler)


@pytest.fixture(scope="module")
def jpeg_data(tiny_data, tmp_path_factory):
    """The tiny training set as JPEGs, one of them (000002.jpg) truncated."""
    json_file, root = _jpeg_copy(tiny_data, "train", tmp_path_factory.mktemp("jpeg") / "images")
    _truncate(os.path.join(root, "000002.jpg"))
    return json_file, root


def _jpeg_cfg(jpeg_data, name, *opts):
    from dkd_det.data import register_coco_format

    cfg = make_cfg(
        DKD_R18,
        "DATASETS.COCO_FORMAT",
        repr([(name, *jpeg_data)]),
        "DATASETS.TRAIN",
        repr((name,)),
        "DATASETS.TEST",
        "()",
        *opts,
    )
    register_coco_format(cfg)
    return cfg


def test_truncated_jpeg_is_named_before_training(jpeg_data):
    from dkd_det.data import BrokenImageError

    cfg = _jpeg_cfg(jpeg_data, "jpeg_truncated")
    with pytest.raises(BrokenImageError) as e:
        Trainer.build_train_loader(cfg)
    message = str(e.value)
    assert "1 of 8 images" in message and "(0 missing, 1 broken)" in message
    assert os.path.join(jpeg_data[1], "000002.jpg") in message and "truncated" in message
    assert "DATALOADER.SKIP_BROKEN_IMAGES" in message


def test_skip_broken_images_warns_with_the_names_and_never_loads_them(jpeg_data):
    cfg = _jpeg_cfg(jpeg_data, "jpeg_skipped", "DATALOADER.SKIP_BROKEN_IMAGES", "True")
    broken = os.path.join(jpeg_data[1], "000002.jpg")
    records, remove = _captured("dkd_det.data.datasets")
    try:
        loader = Trainer.build_train_loader(cfg)
    finally:
        remove()
    assert any("left out of training" in r and broken in r for r in records), records
    seen = set()
    for _, batch in zip(range(12), loader):
        seen.update(d["file_name"] for d in batch)
    assert broken not in seen and len(seen) > 1


def test_all_images_broken_is_an_error_even_when_skipping(tmp_path, tiny_data):
    from dkd_det.data import BrokenImageError, check_images

    json_file, root = _jpeg_copy(tiny_data, "val", tmp_path / "images")
    dicts = [{"file_name": os.path.join(root, n)} for n in sorted(os.listdir(root)) if "jpg" in n]
    for d in dicts:
        open(d["file_name"], "w").close()  # empty files
    with pytest.raises(BrokenImageError, match=r"4 of 4 images .*empty file.*No image is usable"):
        check_images(dicts, ["all_empty"], skip_broken=True)


def test_image_the_check_misses_is_named_by_the_loader(jpeg_data, monkeypatch):
    """Whatever passes the check before training but fails to load later (damage inside the
    compressed data, a file replaced during training) is an error that names the file."""
    import dkd_det.data.datasets as datasets
    from dkd_det.data import BrokenImageError, CheckedDatasetMapper

    broken = os.path.join(jpeg_data[1], "000002.jpg")
    monkeypatch.setattr(datasets, "find_broken_images", lambda paths: {})  # the check misses it
    loader = Trainer.build_train_loader(_jpeg_cfg(jpeg_data, "jpeg_missed"))
    with pytest.raises(BrokenImageError, match=f"Image '{broken}' could not be loaded.*truncated"):
        for _, _batch in zip(range(50), loader):
            pass
    # With SKIP_BROKEN_IMAGES the mapper leaves it out (MapDataset then draws another image).
    cfg = _jpeg_cfg(jpeg_data, "jpeg_missed_skip", "DATALOADER.SKIP_BROKEN_IMAGES", "True")
    records, remove = _captured("dkd_det.data.images")
    try:
        assert (
            CheckedDatasetMapper(cfg, True)({"file_name": broken, "height": 96, "width": 96})
            is None
        )
    finally:
        remove()
    assert any(broken in r for r in records)
    # A test set is never skipped: the Trainer's test loader names the file too.
    with pytest.raises(BrokenImageError, match="000002.jpg"):
        CheckedDatasetMapper(cfg, False)({"file_name": broken, "height": 96, "width": 96})
    test_loader = iter(Trainer.build_test_loader(cfg, "jpeg_missed_skip"))
    first = next(test_loader)[0]  # 000001.jpg, mapped for inference
    assert first["file_name"].endswith("000001.jpg") and "instances" not in first
    with pytest.raises(BrokenImageError, match=f"Image '{broken}' could not be loaded"):
        next(test_loader)


def test_image_check_is_cheap_and_exact(tmp_path, tiny_data):
    """Header plus end marker: every kind of broken file found, a good JPEG with bytes after
    its end marker not mistaken for a broken one."""
    from dkd_det.data import find_broken_images

    _, root = _jpeg_copy(tiny_data, "val", tmp_path / "images")
    good = [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.endswith(".jpg")]
    with open(good[0], "ab") as f:
        f.write(b"\0" * 100)  # padding after EOI: PIL reads it, so must the check
    png = os.path.join(tiny_data["val"][1], sorted(os.listdir(tiny_data["val"][1]))[0])
    bad = {
        "missing.jpg": None,
        "empty.jpg": b"",
        "text.jpg": b"<html>404 Not Found</html>",
        "cut.jpg": open(good[1], "rb").read()[:400],
        "cut.png": open(png, "rb").read()[:200],
    }
    for name, data in bad.items():
        if data is not None:
            with open(tmp_path / name, "wb") as f:
                f.write(data)
    found = find_broken_images(good + [str(tmp_path / n) for n in bad])
    assert list(found) == [str(tmp_path / n) for n in bad]
    assert found[str(tmp_path / "missing.jpg")] == "missing"
    assert "empty" in found[str(tmp_path / "empty.jpg")]
    assert "not an image" in found[str(tmp_path / "text.jpg")]


def test_missing_test_image_is_an_error_before_training(tmp_path, tiny_data, dkd_opts):
    """Not after the whole schedule, at the final evaluation."""
    import shutil

    from dkd_det.data import register_coco_format

    (tj, ti), (vj, vi) = tiny_data["train"], tiny_data["val"]
    root = tmp_path / "val"
    shutil.copytree(vi, root)
    os.remove(root / "000002.png")
    cfg = make_cfg(
        DKD_R18,
        *dkd_opts,
        "DATASETS.COCO_FORMAT",
        repr([("mt_train", tj, ti), ("mt_val", vj, str(root))]),
        "DATASETS.TRAIN",
        "('mt_train',)",
        "DATASETS.TEST",
        "('mt_val',)",
        "DATALOADER.SKIP_BROKEN_IMAGES",
        "True",  # applies to training images only
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    )
    register_coco_format(cfg)
    with pytest.raises(FileNotFoundError) as e:
        Trainer(cfg)
    assert "['mt_val']" in str(e.value) and f"'{root / '000002.png'}' (missing)" in str(e.value)
    assert "An evaluation must see every image" in str(e.value)
    assert not (tmp_path / "out" / "model_final.pth").exists()


# ---------------------------------------------------------------------------------------------
# Weight files that are not checkpoints


def _bad_weights(tmp_path, teacher_weights):
    """{kind: (path, what the error must say)} for files that are not checkpoints."""
    data = open(teacher_weights, "rb").read()
    files = {
        "html": ("page.pth", b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>", "HTML"),
        "text": ("notes.pth", b"version https://git-lfs.github.com/spec/v1\n", "a text file"),
        "empty": ("empty.pth", b"", "an empty file"),
        "cut_zip": ("cut.pth", data[: len(data) // 2], "a truncated torch.save (zip) file"),
        "cut_pkl": ("cut.pkl", pickle_bytes()[:1000], "a truncated pickle"),
        "html_pkl": ("page.pkl", b"<html>502 Bad Gateway</html>", "HTML"),
    }
    out = {}
    for kind, (name, content, says) in files.items():
        with open(tmp_path / name, "wb") as f:
            f.write(content)
        out[kind] = (str(tmp_path / name), says)
    return out


def pickle_bytes():
    import pickle

    import numpy as np

    state = {"w": np.zeros((64, 64), dtype=np.float32)}
    return pickle.dumps({"model": state, "__author__": "Detectron2 Model Zoo"}, protocol=2)


@pytest.mark.parametrize("kind", ["html", "text", "empty", "cut_zip", "cut_pkl", "html_pkl"])
def test_weights_that_are_not_a_checkpoint_are_named(kind, tmp_path, teacher_weights):
    from dkd_det.checkpoint import NotACheckpointError, StrictCheckpointer, resolve_weights

    path, says = _bad_weights(tmp_path, teacher_weights)[kind]
    key = "MODEL.TEACHER.WEIGHTS"
    with pytest.raises(NotACheckpointError) as e:
        StrictCheckpointer(torch.nn.Linear(2, 2), key=key).load(resolve_weights(path, key))
    message = str(e.value)
    assert f"{key} = '{path}' is not a checkpoint" in message and says in message, message


def test_teacher_html_page_named_before_the_model_is_built(tmp_path, dkd_opts, teacher_weights):
    from dkd_det.checkpoint import NotACheckpointError

    path, _ = _bad_weights(tmp_path, teacher_weights)["html"]
    with pytest.raises(NotACheckpointError, match=f"MODEL.TEACHER.WEIGHTS = '{path}'.*HTML"):
        build_model(make_cfg(DKD_R18, *dkd_opts, "MODEL.TEACHER.WEIGHTS", path))


def test_model_weights_not_a_checkpoint_named_by_every_loader(tmp_path, teacher_weights):
    """MODEL.WEIGHTS through the Trainer's lenient load (resolve_weights, then
    AtomicCheckpointer.resume_or_load), the strict student loader, and a resumed run whose
    last_checkpoint names a broken file."""
    from dkd_det.checkpoint import NotACheckpointError, resolve_weights
    from dkd_det.engine import load_student

    bad = _bad_weights(tmp_path, teacher_weights)
    text, _ = bad["text"]
    checkpointer = AtomicCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path / "out"))
    with pytest.raises(NotACheckpointError, match=f"MODEL.WEIGHTS = '{text}'.*a text file"):
        checkpointer.resume_or_load(resolve_weights(text, "MODEL.WEIGHTS"), resume=False)
    cut, _ = bad["cut_zip"]
    with pytest.raises(NotACheckpointError, match="MODEL.WEIGHTS = .*cut.pth"):
        load_student(make_cfg(DKD_R18), cut)
    os.makedirs(tmp_path / "out")
    with open(tmp_path / "out" / "model_0000009.pth", "wb") as f:
        f.write(b"not a checkpoint\n")
    (tmp_path / "out" / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(NotACheckpointError, match="last_checkpoint.*model_0000009.pth.*text file"):
        AtomicCheckpointer(checkpointer.model, save_dir=str(tmp_path / "out")).resume_or_load(
            "", resume=True
        )


def test_trainer_resume_or_load_names_model_weights(
    tmp_path, dkd_opts, dataset_opts, teacher_weights
):
    from dkd_det.checkpoint import NotACheckpointError
    from dkd_det.data import register_coco_format

    text, _ = _bad_weights(tmp_path, teacher_weights)["text"]
    cfg = make_cfg(
        DKD_R18, *dkd_opts, *dataset_opts, "MODEL.WEIGHTS", text, "OUTPUT_DIR", str(tmp_path / "o")
    )
    register_coco_format(cfg)
    with pytest.raises(NotACheckpointError, match=f"MODEL.WEIGHTS = '{text}'"):
        Trainer(cfg).resume_or_load(resume=False)


# ---------------------------------------------------------------------------------------------
# Heads DKD cannot distil


@pytest.mark.parametrize("key", ["USE_SIGMOID_CE", "USE_FED_LOSS"])
def test_sigmoid_or_federated_box_predictor_is_refused(key, dkd_opts):
    # Both refused before any model is built (detectron2 would assert on some combinations).
    with pytest.raises(ValueError, match=f"MODEL.ROI_BOX_HEAD.{key} is True for the student"):
        build_model(make_cfg(DKD_R18, *dkd_opts, f"MODEL.ROI_BOX_HEAD.{key}", "True"))
    cfg = make_cfg(
        DKD_R18, *dkd_opts, "MODEL.TEACHER.OPTS", repr(TINY + [f"MODEL.ROI_BOX_HEAD.{key}", "True"])
    )
    with pytest.raises(ValueError, match=f"MODEL.ROI_BOX_HEAD.{key} is True for the teacher"):
        build_model(cfg)
    # A plain student (no distillation), or one with feature terms only, may use them.
    build_model(
        make_cfg(DKD_R18, "MODEL.DISTILL.TERMS", "[]", "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True")
    )


def test_single_class_warns_that_nckd_vanishes(tmp_path):
    one = ["MODEL.ROI_HEADS.NUM_CLASSES", "1"]
    teacher = save_random_model(make_cfg(R18, *one), str(tmp_path / "one_class.pth"))
    opts = TEACHER_OPTS[:-1] + [repr(TINY + one), "MODEL.TEACHER.WEIGHTS", teacher]
    records, remove = _captured("dkd_det.distill.dkd")
    try:
        build_model(make_cfg(DKD_R18, *opts, *one))
        assert any("NCKD is identically 0" in r and "ALPHA" in r for r in records), records
        records.clear()
        build_model(make_cfg(DKD_R18, *opts, *one, "MODEL.DISTILL.TERMS", "['KD']"))
        assert records == []
    finally:
        remove()
    # It is so: one class, any logits -> NCKD 0.
    from dkd_det.losses import decoupled_kd

    g = torch.Generator().manual_seed(0)
    _, nckd = decoupled_kd(
        torch.randn(16, 2, generator=g),
        torch.randn(16, 2, generator=g),
        torch.randint(0, 2, (16,), generator=g),
        2.0,
    )
    assert nckd.abs().item() < 1e-6


# ---------------------------------------------------------------------------------------------
# Never exercised before: a model-zoo .pkl teacher, precomputed proposals, no ground truth


def test_model_zoo_pkl_teacher_loads_strictly(tmp_path, dkd_opts):
    import pickle

    from dkd_det.modeling import build_teacher

    torch.manual_seed(3)
    reference = build_model(make_cfg(R18))
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    path = str(tmp_path / "model_final_abc123.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    teacher = build_teacher(make_cfg(DKD_R18, *dkd_opts, "MODEL.TEACHER.WEIGHTS", path))
    loaded = teacher.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], torch.as_tensor(v)) for k, v in state.items())
    # Strict: one key fewer is an error that names the file.
    del state[next(iter(state))]
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    with pytest.raises(ValueError, match=f"MODEL.TEACHER.WEIGHTS = '{path}' .*missing keys"):
        build_teacher(make_cfg(DKD_R18, *dkd_opts, "MODEL.TEACHER.WEIGHTS", path))


def _inputs(with_instances=True, with_proposals=False, size=96):
    out = []
    for i in range(2):
        x = {"image": torch.rand(3, size, size) * 255, "height": size, "width": size}
        if with_instances:
            x["instances"] = Instances(
                (size, size),
                gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0]])),
                gt_classes=torch.tensor([i]),
            )
        if with_proposals:
            x["proposals"] = Instances(
                (size, size),
                proposal_boxes=Boxes(
                    torch.tensor([[8.0, 10.0, 52.0, 58.0], [30.0, 30.0, 90.0, 90.0]])
                ),
                objectness_logits=torch.tensor([2.0, 1.0]),
            )
        out.append(x)
    return out


def test_precomputed_proposals_train_like_upstream(dkd_opts):
    """MODEL.LOAD_PROPOSALS: the student has no RPN and takes the inputs' proposals, as
    GeneralizedRCNN.forward does; the teacher still distils on the sampled boxes."""
    model = build_model(
        make_cfg(
            DKD_R18,
            *dkd_opts,
            "MODEL.LOAD_PROPOSALS",
            "True",
            "MODEL.PROPOSAL_GENERATOR.NAME",
            "PrecomputedProposals",
        )
    )
    assert model.proposal_generator is None
    model.train()
    with EventStorage(0):
        losses = model(_inputs(with_proposals=True))
        assert set(losses) == {"loss_cls", "loss_box_reg", "loss_dkd"}
        assert all(torch.isfinite(v) for v in losses.values())
        with pytest.raises(ValueError, match="no 'proposals'.*PROPOSAL_FILES_TRAIN"):
            model(_inputs(with_proposals=False))


def test_training_inputs_without_instances_are_refused_clearly(dkd_opts):
    model = build_model(make_cfg(DKD_R18, *dkd_opts))
    model.train()
    with EventStorage(0), pytest.raises(ValueError, match="ground truth \\('instances'\\)"):
        model(_inputs(with_instances=False))
    model.eval()  # inference needs none
    with torch.no_grad():
        assert len(model(_inputs(with_instances=False))) == 2


# ---------------------------------------------------------------------------------------------
# TCKD/NCKD: the mean over ranks; the image check split over ranks


def _rank_logits(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return (
        torch.randn(32, 4, generator=g) * 3,
        torch.randn(32, 4, generator=g) * 3,
        torch.randint(0, 4, (32,), generator=g),
    )


def _two_rank_worker(out_dir, paths):

    from detectron2.utils import comm

    from dkd_det.data import find_broken_images
    from dkd_det.distill import DKD, DistillInputs

    term = DKD(temperature=2.0, alpha=1.0, beta=8.0)
    z_s, z_t, t = _rank_logits(comm.get_rank())
    with EventStorage(0) as storage:
        term(DistillInputs(None, {}, {}, [], gt_classes=t, student_logits=z_s, teacher_logits=z_t))
        logged = {k: storage.latest()[k][0] for k in ("dkd/tckd", "dkd/nckd")}
    broken = find_broken_images(paths)
    torch.save({"logged": logged, "broken": broken}, os.path.join(out_dir, f"{comm.get_rank()}.pt"))


@pytest.mark.slow
def test_tckd_nckd_are_the_mean_over_ranks(tmp_path, tiny_data):
    """Two GLOO processes: both log the mean of the ranks' TCKD and NCKD (as detectron2 logs
    the losses), and the image check, split between them, gives both the whole answer."""
    from detectron2.engine import launch

    from dkd_det.losses import decoupled_kd

    root = tiny_data["val"][1]
    paths = [os.path.join(root, n) for n in sorted(os.listdir(root))]
    paths += [str(tmp_path / "gone.png"), str(tmp_path / "empty.png")]
    open(tmp_path / "empty.png", "w").close()
    launch(_two_rank_worker, 2, dist_url="auto", args=(str(tmp_path), paths))
    local = [decoupled_kd(*_rank_logits(r), 2.0) for r in (0, 1)]
    for rank in (0, 1):
        out = torch.load(tmp_path / f"{rank}.pt")
        for i, name in enumerate(("dkd/tckd", "dkd/nckd")):
            mean = (local[0][i].item() + local[1][i].item()) / 2
            assert out["logged"][name] == pytest.approx(mean, rel=1e-5), (rank, name)
        assert list(out["broken"]) == paths[-2:]
    assert local[0][0].item() != pytest.approx(local[1][0].item())  # the ranks did differ


# ---------------------------------------------------------------------------------------------
# Export: the teacher's size is its parameters', not its training checkpoint's


def test_export_reports_the_teacher_parameter_size(tmp_path, monkeypatch, capsys, dkd_opts):
    from dkd_det.checkpoint import checkpoint_size

    from helpers import load_tool, save_random_model

    cfg = make_cfg(R18)
    student = save_random_model(cfg, str(tmp_path / "student.pth"))
    model = torch.load(student)["model"]
    params = sum(v.numel() for k, v in model.items() if not k.endswith("num_batches_tracked"))
    # A teacher as a training run leaves it: the model plus SGD momentum for every parameter.
    teacher = str(tmp_path / "teacher_final.pth")
    momentum = {i: {"momentum_buffer": v.clone()} for i, v in enumerate(model.values())}
    torch.save({"model": model, "optimizer": {"state": momentum}, "iteration": 89999}, teacher)
    size = checkpoint_size(teacher)
    assert size["params"] == params
    assert size["mb"] == pytest.approx(params * 4 / 1e6)  # float32
    assert size["file_mb"] > 1.8 * size["mb"]

    tool = load_tool("export_student.py")
    monkeypatch.setattr(tool, "setup_logger", lambda *a, **k: None)
    argv = ["--config-file", DKD_R18, "--weights", student, "--output", str(tmp_path / "exp")]
    argv += TINY + dkd_opts[:-1] + [teacher]  # dkd_opts ends with the teacher's weights
    assert tool.main(argv) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    expected = f"{params * 4 / 1e6:.1f} MB, {params / 1e6:.2f} M parameters"
    assert expected in lines["teacher"] and expected in lines["student"], lines
