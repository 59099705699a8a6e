"""Deployable students (issue 14): TorchScript and ONNX exports through detectron2.export,
the check against the PyTorch student and the missing-extra error (the deploy benchmark:
tests/test_benchmark.py).
Random-init students at tiny sizes; ONNX tests are skipped without onnxruntime."""

import json
import os
import subprocess
import sys
import textwrap

import cv2
import pytest
import torch

from helpers import (
    DKD_R18,
    NUM_CLASSES,
    R18,
    ROOT,
    TINY,
    make_cfg,
    randomise_bn,
    run_tool,
    save_random_model,
)


@pytest.fixture(scope="module")
def student():
    """A tiny random R-18-FPN student with non-trivial BN, in eval mode on the CPU, and its cfg:
    random weights give 100 low-score detections per image, enough to compare. One torch thread
    while this module's tests run; the previous count is restored afterwards, so that other
    tests do not depend on the order they run in."""
    from detectron2.modeling import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = make_cfg(R18)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    randomise_bn(model)
    try:
        yield cfg, model
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(student):
    from dkd_det.export import sample_inputs

    return sample_inputs(student[0], num_random=1)


def _det(boxes, scores, classes):
    from dkd_det.export import Detections

    return Detections(torch.tensor(boxes).float(), torch.tensor(scores), torch.tensor(classes))


def test_compare_detections_matches_within_tolerance_and_names_the_rest():
    from dkd_det.export import Tolerances, compare_detections

    ref = _det([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 3, 3]], [0.9, 0.5, 0.051], [0, 1, 2])
    tol = Tolerances(box_px=0.05, score=1e-3)
    # Reordered, within tolerance, and the last one dropped at the score threshold: agrees.
    got = _det([[5.01, 5, 20, 20], [0, 0, 10, 10.04]], [0.5005, 0.9], [1, 0])
    stats, problems = compare_detections(ref, got, tol, score_thresh=0.05, max_dets=100)
    assert problems == []
    assert stats["matched"] == 2 and stats["borderline"] == 1
    assert stats["max_box_px"] == pytest.approx(0.04, abs=1e-5)
    assert stats["max_score"] == pytest.approx(5e-4, abs=1e-6)

    # A box 0.1 px off, a class changed: both named, as is the exported-only detection.
    got = _det([[0, 0, 10, 10.1], [5, 5, 20, 20]], [0.9, 0.5], [0, 2])
    _, problems = compare_detections(ref, got, tol, score_thresh=0.05, max_dets=100)
    assert len(problems) == 4
    assert "PyTorch's class 0, score 0.9000, box [0.00, 0.00, 10.00, 10.00]" in problems[0]
    assert "nearest exported: class 0, score 0.9000, box [0.00, 0.00, 10.00, 10.10]" in problems[0]
    assert any("exported class 2" in p and "is not in PyTorch's output" in p for p in problems)

    # At the DETECTIONS_PER_IMAGE cap (3 here), the last kept score is the cut-off: the
    # exported model may have kept another detection of about that score instead.
    full = _det([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 3, 3]], [0.9, 0.5, 0.3], [0, 1, 2])
    swapped = _det([[0, 0, 10, 10], [5, 5, 20, 20], [7, 7, 9, 9]], [0.9, 0.5, 0.3], [0, 1, 1])
    stats, problems = compare_detections(full, swapped, tol, score_thresh=0.05, max_dets=3)
    assert problems == [] and stats["borderline"] == 2
    _, problems = compare_detections(full, swapped, tol, score_thresh=0.05, max_dets=100)
    assert len(problems) == 2


@pytest.mark.parametrize("method", ["trace", "script"])
def test_torchscript_export_reproduces_the_student(student, inputs, tmp_path, method):
    from dkd_det.export import DeployedModel, export_deployable, pytorch_detections

    cfg, model = student
    out = export_deployable(
        cfg, model, str(tmp_path), "torchscript", inputs, ["a", "b", "c"], method=method
    )
    assert sorted(os.listdir(tmp_path)) == ["deploy.json", "model.ts"]
    check = out["check"]
    # Two images, the second of another aspect ratio than the tracing input, and the first
    # enlarged then shrunk 0.3x by the resize.
    assert check["images"] == 3 and inputs[0][1].shape[1:] != inputs[1][1].shape[1:]
    assert check["detections"] > 0 and check["matched"] + check["borderline"] >= 1
    info = json.loads((tmp_path / "deploy.json").read_text())
    assert info["format"] == "torchscript" and info["method"] == method
    assert info["input"]["channel_order"] == "RGB"  # the R-18 config's torchvision weights
    assert info["input"]["pixel_mean"] == list(cfg.MODEL.PIXEL_MEAN)
    assert info["input"]["resize"]["min_size"] == cfg.INPUT.MIN_SIZE_TEST
    assert info["thing_classes"] == ["a", "b", "c"]
    assert info["check"]["tolerances"] == {"box_px": 0.05, "score": 1e-3}

    deployed = DeployedModel(str(tmp_path))
    for _, image in inputs:
        ref, got = pytorch_detections(model, image), deployed(image)
        # Same CPU, same kernels: equal up to float rounding.
        torch.testing.assert_close(got.boxes, ref.boxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(got.scores, ref.scores, rtol=0, atol=1e-5)
        assert torch.equal(got.classes, ref.classes)


def test_failed_check_names_the_difference_and_removes_the_export(student, inputs, tmp_path):
    from dkd_det.export import DeployCheckError, Tolerances, export_deployable

    cfg, model = student
    impossible = Tolerances(box_px=-1.0, score=-1.0)  # nothing can match
    with pytest.raises(DeployCheckError) as e:
        export_deployable(cfg, model, str(tmp_path), "torchscript", inputs, tol=impossible)
    message = str(e.value)
    assert "The torchscript export does not reproduce the PyTorch student on random image 0" in (
        message
    )
    assert "beyond the tolerances (box -1.0 px, score -1.0, same class)" in message
    assert "has no exported counterpart" in message
    assert os.listdir(tmp_path) == []


def test_onnx_export_reproduces_the_student_through_onnxruntime(student, inputs, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import onnx

    from dkd_det.export import (
        ONNX_OPSET,
        DeployedModel,
        export_deployable,
        pytorch_detections,
    )

    cfg, model = student
    out = export_deployable(cfg, model, str(tmp_path), "onnx", inputs)
    assert sorted(os.listdir(tmp_path)) == ["deploy.json", "model.onnx"]
    assert out["check"]["images"] == 3 and out["check"]["detections"] > 0
    info = json.loads((tmp_path / "deploy.json").read_text())
    assert ONNX_OPSET == 17 and info["opset"] == ONNX_OPSET and info["exporter"] == "legacy"
    # The file's own opset is the one asked for (the dynamo exporter would have written 18).
    opsets = {o.domain: o.version for o in onnx.load(out["model"]).opset_import}
    assert opsets[""] == ONNX_OPSET
    assert info["outputs"] == ["pred_boxes", "pred_classes", "scores", "image_size"]
    deployed = DeployedModel(str(tmp_path))
    assert [i.name for i in deployed.model.get_inputs()] == ["image"]
    ref, got = pytorch_detections(model, inputs[1][1]), deployed(inputs[1][1])
    assert len(got.scores) == len(ref.scores)


def test_onnx_opset_below_16_is_refused_with_the_reason(student, inputs, tmp_path):
    pytest.importorskip("onnx")
    from dkd_det.export import export_onnx

    cfg, model = student
    with pytest.raises(ValueError, match="opset 11 cannot express detectron2's ROIAlignV2"):
        export_onnx(model, inputs[0][1], str(tmp_path / "m.onnx"), opset=11)


# --- the tool, run as users run it -----------------------------------------------------------

NO_TEACHER = ["MODEL.TEACHER.WEIGHTS", "/no/teacher.pth"]


@pytest.fixture(scope="module")
def student_weights(tmp_path_factory):
    """A random-init student of configs/COCO/dkd_r101_r18.yaml, as training saves it."""
    cfg = make_cfg(DKD_R18, "MODEL.DISTILL.TERMS", "[]")
    return save_random_model(cfg, str(tmp_path_factory.mktemp("student") / "model_final.pth"))


def _export(fmt, weights, out, *extra):
    return run_tool(
        "export_student.py",
        "--config-file",
        DKD_R18,
        "--weights",
        weights,
        "--output",
        str(out),
        "--format",
        fmt,
        *extra,
        *TINY,
        *NO_TEACHER,
    )


@pytest.mark.slow
def test_tool_exports_torchscript_that_runs_without_dkd_det_or_detectron2(
    student_weights, dataset_opts, tiny_data, tmp_path
):
    out = tmp_path / "ts"
    run = _export("torchscript", student_weights, out, *dataset_opts)
    assert run.returncode == 0, run.stdout[-3000:]
    # 3 val + 1 random + the first shrunk 0.3x
    assert "model.ts" in run.stdout and "check: 5 images" in run.stdout
    info = json.loads((out / "deploy.json").read_text())
    assert len(info["thing_classes"]) == NUM_CLASSES

    # The README's recipe, in a process that imports neither dkd_det nor detectron2.
    val_root = tiny_data["val"][1]
    image = os.path.join(val_root, sorted(os.listdir(val_root))[0])
    result = str(tmp_path / "plain.pt")
    script = textwrap.dedent(f"""
        import json, sys, cv2, torch, torchvision
        info = json.load(open({str(out / 'deploy.json')!r}))
        model = torch.jit.load({str(out / 'model.ts')!r})
        bgr = cv2.imread({image!r})
        h, w = bgr.shape[:2]
        size = info["input"]["resize"]["min_size"]
        scale = min(size / min(h, w), info["input"]["resize"]["max_size"] / max(h, w))
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        img = bgr[:, :, ::-1] if info["input"]["channel_order"] == "RGB" else bgr
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        x = torch.as_tensor(img.astype("float32").transpose(2, 0, 1))
        out = dict(zip(info["outputs"], model(x)))
        torch.save((x, out), {result!r})
        assert not any(m.split(".")[0] in ("dkd_det", "detectron2") for m in sys.modules)
        """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=str(tmp_path),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    x, plain = torch.load(result)

    from dkd_det.engine import load_student
    from dkd_det.export import pytorch_detections, resize_for_model

    cfg = make_cfg(DKD_R18, *NO_TEACHER, "MODEL.WEIGHTS", student_weights)
    rgb = cv2.imread(image)[:, :, ::-1].copy()
    assert torch.equal(x, resize_for_model(cfg, rgb))  # the README's resize is detectron2's
    ref = pytorch_detections(load_student(cfg), x)
    assert len(ref.scores) > 0
    torch.testing.assert_close(plain["pred_boxes"], ref.boxes, rtol=0, atol=1e-3)
    torch.testing.assert_close(plain["scores"], ref.scores, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_tool_exports_onnx_and_checks_it_with_onnxruntime(student_weights, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    run = _export("onnx", student_weights, tmp_path, "--num-check-images", "2")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "model.onnx" in run.stdout and "check: 3 images" in run.stdout  # random only
    assert "random images only" in run.stdout
    assert sorted(os.listdir(tmp_path)) == ["deploy.json", "model.onnx"]


@pytest.mark.slow
def test_onnx_without_the_extra_says_what_to_install(tmp_path):
    """onnx and onnxruntime made unimportable whether or not they are installed: a None entry
    in sys.modules is Python's own "not importable" (import raises ModuleNotFoundError,
    importlib.util.find_spec answers None)."""
    script = textwrap.dedent(f"""
        import runpy, sys

        sys.modules["onnx"] = sys.modules["onnxruntime"] = None
        sys.argv = ["export_student.py", "--config-file", {DKD_R18!r}, "--weights",
                    {str(tmp_path / "missing.pth")!r}, "--output", {str(tmp_path / "out")!r},
                    "--format", "onnx"]
        sys.exit(runpy.run_path({os.path.join(ROOT, "tools", "export_student.py")!r},
                                run_name="__main__"))
        """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--format onnx needs onnx and onnxruntime" in proc.stderr
    assert "pip install 'dkd_det[deploy]'" in proc.stderr and "make setup" in proc.stderr
    assert "missing.pth" not in proc.stderr  # it failed before looking at the weights
    assert not (tmp_path / "out").exists()
