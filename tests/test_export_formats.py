"""The deploy recipe a user copies is the one the model was checked with (issue 18): trace,
script and ONNX exports of the R-50 and MobileNetV2 students (R-18's are in test_deploy.py),
the README's PIL recipe against detectron2's resize on a 0.3x shrink, a check on no real image
or without detections, the training config beside the checkpoint, and one-line exporter errors.
Random-init students at tiny sizes; ONNX is skipped without onnxruntime."""

import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from helpers import (
    DKD_R18,
    R18,
    R50,
    ROOT,
    TINY,
    load_tool,
    make_cfg,
    randomise_bn,
    save_random_model,
)

MV2 = os.path.join(ROOT, "configs/COCO/faster_rcnn_mv2_fpn.yaml")
NO_TEACHER = ["MODEL.TEACHER.WEIGHTS", "/no/teacher.pth"]


def _student(config, *opts):
    torch.manual_seed(0)
    cfg = make_cfg(config, *opts)
    model = build_model(cfg).eval()
    randomise_bn(model)
    return cfg, model


@pytest.fixture
def two_threads():
    """Two torch threads for the test, the previous count restored afterwards: other tests'
    results must not depend on the order they run in."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["trace", "script", "onnx"])
@pytest.mark.parametrize("config", [R50, MV2], ids=["R-50", "MobileNetV2"])
def test_students_export_to_every_format(config, how, tmp_path, two_threads):
    from dkd_det.export import DeployedModel, export_deployable, sample_inputs

    if how == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    cfg, model = _student(config)
    # Two shapes (the 0.3x shrink is tested below, on R-18).
    inputs = sample_inputs(cfg, num_random=1, shrink=None)
    fmt, method = ("onnx", "trace") if how == "onnx" else ("torchscript", how)
    out = export_deployable(cfg, model, str(tmp_path), fmt, inputs, method=method)
    check = out["check"]
    assert check["images"] == 2 and check["detections"] > 0
    # Every PyTorch detection reproduced, or (at the score cut) tolerated.
    assert check["matched"] + check["borderline"] >= check["detections"]
    assert check["matched"] > 0.9 * check["detections"]
    deployed = DeployedModel(str(tmp_path))
    assert deployed.info["format"] == fmt and deployed.info.get("method", "trace") == method
    assert len(deployed(inputs[1][1]).scores) > 0


def test_check_on_no_detection_fails_and_keeps_the_previous_export(tmp_path):
    from dkd_det.export import DeployCheckError, export_deployable, sample_inputs

    cfg, model = _student(R18, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0")  # nothing passes
    inputs = sample_inputs(cfg, num_random=1, shrink=None)
    # The library records such a check (tools/benchmark.py times random students with it).
    out = export_deployable(cfg, model, str(tmp_path), "torchscript", inputs)
    assert out["check"]["detections"] == 0
    warning = json.loads(open(out["info"]).read())["check"]["warning"]
    assert "no real image" in warning and "detected nothing: nothing was compared" in warning
    before = {n: (tmp_path / n).read_bytes() for n in ("model.ts", "deploy.json")}

    with torch.no_grad():  # another model, so that a replaced model.ts would differ
        model.roi_heads.box_predictor.cls_score.bias += 1.0
    with pytest.raises(DeployCheckError) as e:
        export_deployable(cfg, model, str(tmp_path), "torchscript", inputs, require_detections=True)
    assert "the PyTorch student detected nothing in any of them" in str(e.value)
    assert "--allow-no-detections" in str(e.value)
    # The failed export replaced nothing: the previous one is whole.
    assert sorted(os.listdir(tmp_path)) == ["deploy.json", "model.ts"]
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data


# --- the README's recipe ------------------------------------------------------------------


def _readme_recipe():
    """The python block of README.md's "Running it without dkd-det", as a user copies it."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("**Running it without dkd-det**") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_recipe_is_detectron2s_resize_on_a_03x_shrink(tmp_path, tiny_data):
    """The README's recipe, run verbatim (but for the paths) in a process without dkd-det or
    detectron2, on an image that the resize shrinks 0.3x: the same input tensor as
    detectron2's resize (the one the export's check uses), bit for bit, and the same
    detections. cv2.INTER_LINEAR, the recipe's previous resize, gives other pixels there."""
    from detectron2.data.detection_utils import read_image

    from dkd_det.export import (
        export_deployable,
        pytorch_detections,
        resize_for_model,
        sample_inputs,
    )

    cfg, model = _student(R18)  # TINY: MIN_SIZE_TEST 96, MAX_SIZE_TEST 128
    folder = tmp_path / "deploy"
    inputs = sample_inputs(cfg, num_random=1)
    export_deployable(cfg, model, str(folder), "torchscript", inputs, classes=["a", "b", "c"])
    val_root = tiny_data["val"][1]
    small = Image.open(os.path.join(val_root, sorted(os.listdir(val_root))[0])).convert("RGB")
    photo = str(tmp_path / "photo.png")
    small.resize((400, 320), Image.BICUBIC).save(photo)  # 320 -> 96: shrunk 0.3x

    recipe = _readme_recipe()
    line = 'folder, path = "deploy/dkd_r101_r18_ts", "photo.jpg"\n'
    assert line in recipe
    result = str(tmp_path / "recipe.pt")
    script = recipe.replace(line, f"folder, path = {str(folder)!r}, {photo!r}\n") + (
        f"torch.save((x, out), {result!r})\n"
        'assert not any(m.split(".")[0] in ("dkd_det", "detectron2") for m in sys.modules)\n'
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\n" + script],
        cwd=str(tmp_path),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    x, out = torch.load(result)

    image = read_image(photo, format=cfg.INPUT.FORMAT)
    assert x.shape[1:] == (96, 120)
    assert torch.equal(x, resize_for_model(cfg, image))
    linear = cv2.resize(image, (120, 96), interpolation=cv2.INTER_LINEAR)
    assert not np.array_equal(linear, x.numpy().transpose(1, 2, 0).astype(np.uint8))
    ref = pytorch_detections(model, x)
    assert len(ref.scores) > 0
    torch.testing.assert_close(out["pred_boxes"], ref.boxes, rtol=0, atol=1e-3)
    torch.testing.assert_close(out["scores"], ref.scores, rtol=0, atol=1e-4)


# --- the tool ----------------------------------------------------------------------------------


@pytest.fixture
def export_tool(monkeypatch):
    tool = load_tool("export_student.py")
    monkeypatch.setattr(tool, "setup_logger", lambda *a, **k: None)
    return tool


def _argv(weights, out, *extra):
    return [
        "--config-file",
        DKD_R18,
        "--weights",
        weights,
        "--output",
        str(out),
        *extra,
        *NO_TEACHER,
    ]


def test_tool_records_preprocessing_and_says_when_no_real_image_was_checked(
    tmp_path, export_tool, capsys
):
    """config.yaml beside the checkpoint, as detectron2's default_setup writes it."""
    run = tmp_path / "output"
    run.mkdir()
    cfg = make_cfg(DKD_R18, "MODEL.DISTILL.TERMS", "[]")
    weights = save_random_model(cfg, str(run / "model_final.pth"))
    (run / "config.yaml").write_text(cfg.dump())

    out = tmp_path / "ts"
    assert export_tool.main(_argv(weights, out, "--format", "torchscript", *TINY)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("check: 3 images")  # random, its transpose, the 0.3x shrink
    assert lines[-1].startswith("warning: the check ran on no real image")
    info = json.loads((out / "deploy.json").read_text())
    assert info["check"]["real_images"] == 0 and "no real image" in info["check"]["warning"]
    assert any("shrunk 0.3x by the resize" in name for name in info["check"]["inputs"])
    assert info["config"] == {
        "INPUT.FORMAT": "RGB",
        "MODEL.PIXEL_MEAN": list(cfg.MODEL.PIXEL_MEAN),
        "MODEL.PIXEL_STD": list(cfg.MODEL.PIXEL_STD),
        "INPUT.MIN_SIZE_TEST": 96,
        "INPUT.MAX_SIZE_TEST": 128,
    }
    assert info["training_config"] == str(run / "config.yaml")
    assert "PIL.Image.BILINEAR" in info["input"]["resize"]["interpolation"]

    # Preprocessing other than training's is refused, before anything is loaded or written.
    changed = [*TINY, "INPUT.MIN_SIZE_TEST", "128", "INPUT.FORMAT", "BGR"]
    assert export_tool.main(_argv(weights, tmp_path / "a", *changed)) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: The export's preprocessing differs from the training config {run}"
    )
    assert "INPUT.FORMAT: 'BGR' here, 'RGB' in training" in err
    assert "INPUT.MIN_SIZE_TEST: 128 here, 96 in training" in err
    assert "--ignore-training-config" in err and not (tmp_path / "a").exists()
    argv = _argv(weights, tmp_path / "b", "--ignore-training-config", *changed)
    assert export_tool.main(argv) == 0
    assert (tmp_path / "b" / "model_final.pth").is_file()


def test_tool_fails_a_check_without_detections_unless_accepted(tmp_path, export_tool, capsys):
    cfg = make_cfg(DKD_R18, "MODEL.DISTILL.TERMS", "[]")
    weights = save_random_model(cfg, str(tmp_path / "model_final.pth"))
    none = ["--format", "torchscript", *TINY, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"]
    assert export_tool.main(_argv(weights, tmp_path / "a", *none)) == 1
    err = capsys.readouterr().err
    assert "error: The torchscript export was checked on 3 images" in err
    assert "detected nothing" in err and "--allow-no-detections" in err
    assert os.listdir(tmp_path / "a") == []
    assert export_tool.main(_argv(weights, tmp_path / "b", "--allow-no-detections", *none)) == 0
    assert "check: 3 images, 0 of 0 PyTorch detections" in capsys.readouterr().out


@pytest.mark.slow
def test_tool_turns_an_exporter_failure_into_one_line(tmp_path, export_tool, capsys):
    """A real failure: detectron2's deformable convolution is neither scriptable nor traceable
    nor exportable to ONNX."""
    deform = ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, False, False, True]"]
    weights = save_random_model(make_cfg(R50, *deform), str(tmp_path / "model_final.pth"))
    argv = ["--config-file", R50, "--weights", weights, "--output", str(tmp_path / "out")]
    argv += ["--format", "torchscript", "--torchscript-method", "script", *TINY, *deform]
    assert export_tool.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert re.fullmatch(
        r"error: TorchScript \(script\) export failed: RuntimeError: .+ "
        r"\(at .+/detectron2/layers/deform_conv\.py, line \d+\)",
        err,
    ), err
    assert not (tmp_path / "out" / "model.ts").exists()
