"""tools/demo.py and tools/export_student.py run as users run them (processes), on
generated images and random-init weights."""

import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from helpers import (
    DKD_R18,
    NUM_CLASSES,
    TINY,
    make_cfg,
    run_tool,
    save_random_model,
    vanilla_predictions,
)

# The distillation config made tiny; the teacher's weights point nowhere: inference and
# export must never load the teacher.
NO_TEACHER = ["MODEL.TEACHER.WEIGHTS", "/no/teacher.pth"]


@pytest.fixture(scope="module")
def student_weights(tmp_path_factory):
    """A random-init student of configs/COCO/dkd_r101_r18.yaml, as training saves it."""
    cfg = make_cfg(DKD_R18, "MODEL.DISTILL.TERMS", "[]")
    return save_random_model(cfg, str(tmp_path_factory.mktemp("student") / "model_final.pth"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, student_weights, dkd_opts, dataset_opts):
    """tools/export_student.py's output folder and its stdout."""
    out = str(tmp_path_factory.mktemp("exported"))
    run = run_tool(
        "export_student.py",
        "--config-file",
        DKD_R18,
        "--weights",
        student_weights,
        "--output",
        out,
        *TINY,
        *dkd_opts,
        *dataset_opts,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    return out, run.stdout


@pytest.mark.slow
def test_demo_skips_a_corrupt_image_and_fails(tmp_path, tiny_data, student_weights, dataset_opts):
    val_json, val_root = tiny_data["val"]
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(os.listdir(val_root))[:2]
    for name in names:
        shutil.copy(os.path.join(val_root, name), images / name)
    with open(os.path.join(val_root, names[0]), "rb") as f:
        (images / "corrupt.png").write_bytes(f.read()[:200])  # a truncated PNG
    out = tmp_path / "out"

    run = run_tool(
        "demo.py",
        "--config-file",
        DKD_R18,
        "--input",
        str(images),
        "--output",
        str(out),
        "--confidence-threshold",
        "0.0",
        "--opts",
        *TINY,
        *NO_TEACHER,
        *dataset_opts,
        "MODEL.WEIGHTS",
        student_weights,
    )
    assert run.returncode != 0, run.stdout[-3000:]
    assert f"{images / 'corrupt.png'}: cannot read the image" in run.stdout
    assert sorted(os.listdir(out)) == names
    for name in names:
        assert f"{images / name}: " in run.stdout and " detections in " in run.stdout
        original = cv2.imread(str(images / name))
        drawn = cv2.imread(str(out / name))
        assert drawn.shape == original.shape
        assert not np.array_equal(drawn, original)  # detections were drawn


@pytest.mark.slow
def test_demo_missing_weights_is_an_error_before_any_work(tmp_path, tiny_data):
    out = tmp_path / "out"
    run = run_tool(
        "demo.py",
        "--config-file",
        DKD_R18,
        "--input",
        tiny_data["val"][1],
        "--output",
        str(out),
        "--opts",
        *TINY,
        "MODEL.WEIGHTS",
        str(tmp_path / "missing.pth"),
    )
    assert run.returncode != 0
    assert f"MODEL.WEIGHTS = '{tmp_path / 'missing.pth'}': no such file" in run.stdout
    assert not out.exists()

    run = run_tool(
        "demo.py",
        "--config-file",
        str(tmp_path / "nope.yaml"),
        "--input",
        tiny_data["val"][1],
        "--output",
        str(out),
    )
    assert run.returncode != 0
    assert "nope.yaml': no such file" in run.stdout
    assert not out.exists()


@pytest.mark.slow
def test_exported_student_is_plain_detectron2(
    exported, student_weights, dkd_opts, dataset_opts, tiny_data, tmp_path
):
    out, stdout = exported
    assert sorted(os.listdir(out)) == ["config.yaml", "metadata.json", "model_final.pth"]
    text = open(os.path.join(out, "config.yaml")).read()
    for key in ("DISTILL", "TEACHER", "COCO_FORMAT", "DistillationRCNN", "DistillROIHeads"):
        assert key not in text
    assert "student: " in stdout and "teacher: " in stdout and stdout.count(" MB, ") == 2
    with open(os.path.join(out, "metadata.json")) as f:
        assert len(json.load(f)["thing_classes"]) == NUM_CLASSES

    # Vanilla detectron2, in a process that never imports dkd_det.
    images = [
        os.path.join(tiny_data["val"][1], n) for n in sorted(os.listdir(tiny_data["val"][1]))[:2]
    ]
    vanilla = vanilla_predictions(
        os.path.join(out, "config.yaml"),
        images,
        tmp_path,
        ("pred_boxes", "scores", "pred_classes"),
        check='type(model.roi_heads).__name__ == "StandardROIHeads"',
    )

    # The distillation model, teacher included, in inference.
    from detectron2.engine import DefaultPredictor

    torch.set_num_threads(2)
    predictor = DefaultPredictor(
        make_cfg(DKD_R18, *dkd_opts, *dataset_opts, "MODEL.WEIGHTS", student_weights)
    )
    assert predictor.model.teacher is not None
    for path, (boxes, scores, classes) in zip(images, vanilla):
        inst = predictor(cv2.imread(path))["instances"]
        assert len(inst) > 0
        # Same weights, same code path, same thread count: bit-identical.
        assert torch.equal(inst.pred_boxes.tensor, boxes)
        assert torch.equal(inst.scores, scores)
        assert torch.equal(inst.pred_classes, classes)


@pytest.mark.slow
def test_demo_on_a_video_with_the_exported_student(exported, tiny_data, tmp_path):
    out_dir, _ = exported
    frames = [
        cv2.imread(os.path.join(tiny_data["val"][1], n))
        for n in sorted(os.listdir(tiny_data["val"][1]))
    ]
    frames = (frames * 2)[:5]
    video = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (96, 96))
    for frame in frames:
        writer.write(frame)
    writer.release()

    run = run_tool(
        "demo.py",
        "--config-file",
        os.path.join(out_dir, "config.yaml"),
        "--video-input",
        video,
        "--output",
        str(tmp_path / "out"),
        "--confidence-threshold",
        "0.0",
        "--opts",
        "MODEL.DEVICE",
        "cpu",
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert "5 frames in" in run.stdout
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.avi"))
    count = 0
    while capture.read()[0]:
        count += 1
    assert count == 5
