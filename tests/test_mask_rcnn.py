"""Mask R-CNN students and teachers (issue 20): the synthetic world's polygon masks, DKD on a
Mask R-CNN student's box classifier while its mask head trains as usual (the teacher's mask head
never runs), box and mask AP, the exports with masks (vanilla detectron2, TorchScript, ONNX) and
the demo drawing masks. Random-init teachers and students at tiny sizes."""

import hashlib
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import (
    ROOT,
    TINY,
    load_tool,
    make_cfg,
    run_tool,
    save_random_model,
    vanilla_predictions,
)

MASK = os.path.join(ROOT, "configs", "COCO-InstanceSegmentation")
MASK_R18 = os.path.join(MASK, "mask_rcnn_r18_fpn.yaml")
MASK_DKD_R18 = os.path.join(MASK, "dkd_r101_r18.yaml")
NO_TEACHER = ["MODEL.TEACHER.WEIGHTS", "/no/teacher.pth"]


@pytest.fixture(scope="module")
def mask_teacher_opts(tmp_path_factory):
    """A random-init Mask R-CNN R-18 teacher in detectron2's format, as the teacher overrides
    of a Mask R-CNN distillation config."""
    path = str(tmp_path_factory.mktemp("mask_teacher") / "teacher.pth")
    save_random_model(make_cfg(MASK_R18), path)
    return ["MODEL.TEACHER.CONFIG_FILE", MASK_R18, "MODEL.TEACHER.OPTS", repr(TINY)] + [
        "MODEL.TEACHER.WEIGHTS",
        path,
    ]


# ---- the synthetic world's masks ------------------------------------------------------------

# The tiny_data fixture's boxes and images, written before the generator wrote masks: adding
# the polygons drew nothing more from the generator, so the Faster R-CNN benchmark's data is
# the same for the same seed. The JSON's floats (boxes and areas in pixels of a 96-pixel image)
# are hashed rounded to 4 decimals: their last bits differ with numpy's version and the CPU's
# vector instructions (1e-12 apart here), far below 1e-4 px, while any change of the data the
# generator draws moves them by much more. The same digests on the oldest and current stacks.
BEFORE_MASKS = {
    "train": ("00ac07f238099011", "8ef05d29134d6767"),
    "val": ("b5c7328d3943a948", "e461a281280cf791"),
}


def _rounded(value, places=4):
    if isinstance(value, float):
        return round(value, places)
    if isinstance(value, dict):
        return {k: _rounded(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, places) for v in value]
    return value


def test_synthetic_masks_are_the_drawn_shapes_and_the_rest_is_unchanged(tiny_data):
    from detectron2.data import detection_utils
    from detectron2.data.datasets import load_coco_json

    from dkd_det.data.synthetic import COLOURS

    for split, (json_file, root) in tiny_data.items():
        with open(json_file) as f:
            coco = json.load(f)
        polygons = [a.pop("segmentation") for a in coco["annotations"]]
        pixels = hashlib.sha256()
        for image in coco["images"]:
            pixels.update(cv2.imread(os.path.join(root, image["file_name"])).tobytes())
        digest = hashlib.sha256(json.dumps(_rounded(coco), sort_keys=True).encode()).hexdigest()
        assert (digest[:16], pixels.hexdigest()[:16]) == BEFORE_MASKS[split], split

        for ann, polygon in zip(coco["annotations"], polygons):
            (poly,) = polygon
            xy = np.array(poly).reshape(-1, 2)
            x, y, w, h = ann["bbox"]
            assert len(xy) >= 3 and xy.min() >= 0 and xy.max() <= 96
            # The polygon fills its box (the box of the clipped shape: equal unless clipped).
            assert xy.min(0) == pytest.approx([x, y], abs=0.5)
            assert xy.max(0) == pytest.approx([x + w, y + h], abs=0.5)

        # detectron2's COCO loader and mapper give a mask per box; the last-drawn object of each
        # image (nothing occludes it) has its colour under its mask.
        dicts = load_coco_json(json_file, root, f"mask_check_{split}")
        names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        for d in dicts:
            inst = detection_utils.annotations_to_instances(d["annotations"], (96, 96))
            assert len(inst.gt_masks) == len(inst.gt_boxes) == len(d["annotations"])
            top = d["annotations"][-1]
            mask = inst.gt_masks[len(inst) - 1 :].polygons[0]
            raster = np.zeros((96, 96), np.uint8)
            cv2.fillPoly(raster, [np.round(p.reshape(-1, 2)).astype(np.int32) for p in mask], 1)
            inner = cv2.erode(raster, np.ones((3, 3), np.uint8)).astype(bool)
            if inner.sum() < 10:
                continue
            rgb = cv2.imread(d["file_name"])[:, :, ::-1][inner].mean(0)
            colour = names[top["category_id"]].split("-")[0]
            assert np.abs(rgb - COLOURS[colour]).max() < 40, (d["file_name"], rgb, colour)


# ---- training: DKD on the box classifier, the mask head on its own loss ---------------------


def test_mask_student_distils_its_box_classifier_and_trains_its_mask_head(
    tiny_data, dataset_opts, mask_teacher_opts
):
    from detectron2.data import DatasetCatalog

    from dkd_det.data import CheckedDatasetMapper, register_coco_format

    cfg = make_cfg(MASK_DKD_R18, *mask_teacher_opts, *dataset_opts)
    register_coco_format(cfg)
    mapper = CheckedDatasetMapper(cfg, True)
    inputs = [mapper(d) for d in DatasetCatalog.get("tiny_train")[:2]]
    assert all(x["instances"].has("gt_masks") for x in inputs)
    model = build_model(cfg)
    assert model.roi_heads.mask_on and model.teacher.roi_heads.mask_on
    ran = {"teacher_mask": 0, "teacher_box": 0}
    teacher = model.teacher.roi_heads
    for part in (teacher.mask_head, *teacher.mask_pooler.level_poolers):
        part.register_forward_hook(lambda *_: ran.__setitem__("teacher_mask", 1))
    teacher.box_head.register_forward_hook(lambda *_: ran.__setitem__("teacher_box", 1))
    model.train()
    with EventStorage(0):
        losses = model(inputs)
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_dkd"} <= losses.keys()
    assert all(torch.isfinite(v) for v in losses.values())
    assert ran == {"teacher_mask": 0, "teacher_box": 1}  # its logits, never its masks
    losses["loss_mask"].backward(retain_graph=True)
    assert model.roi_heads.mask_head.predictor.weight.grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.cls_score.weight.grad is None  # masks: their own loss
    losses["loss_dkd"].backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_mask_configs_are_the_faster_rcnn_students_with_a_mask_head():
    """Student initialisation, normalisation and schedule exactly as configs/COCO's Faster
    R-CNN configs (and the synthetic ones), the teacher the model zoo's Mask R-CNN R-101."""
    from dkd_det.config import get_dkd_cfg

    coco, synthetic = os.path.join(ROOT, "configs", "COCO"), os.path.join(ROOT, "configs/Synthetic")
    pairs = [
        (
            os.path.join(MASK, f"mask_rcnn_r{d}_fpn.yaml"),
            os.path.join(coco, f"faster_rcnn_r{d}_fpn.yaml"),
        )
        for d in (18, 50)
    ] + [
        (os.path.join(MASK, f"dkd_r101_r{d}.yaml"), os.path.join(coco, f"dkd_r101_r{d}.yaml"))
        for d in (18, 50)
    ]
    pairs += [
        (os.path.join(synthetic, f"mask_{name}.yaml"), os.path.join(synthetic, f"{name}.yaml"))
        for name in ("student_r18_fpn", "student_r18_fpn_scratch", "teacher_r50_fpn")
    ]
    for mask_file, box_file in pairs:
        mask, box = get_dkd_cfg(mask_file), get_dkd_cfg(box_file)
        assert mask.MODEL.MASK_ON and not box.MODEL.MASK_ON, mask_file
        assert mask.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead"
        assert (mask.MODEL.ROI_MASK_HEAD.NUM_CONV, mask.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION) == (
            4,
            14,
        )
        for c in (mask, box):
            c.MODEL.MASK_ON, c.MODEL.ROI_MASK_HEAD = False, None
            c.OUTPUT_DIR = ""
            c.MODEL.TEACHER.CONFIG_FILE = c.MODEL.TEACHER.WEIGHTS = ""
        assert mask.MODEL == box.MODEL, mask_file
        if "scratch" not in mask_file:  # the box demo's students: 96-pixel inputs, 160 iterations
            assert mask == box, mask_file
    dkd = get_dkd_cfg(MASK_DKD_R18)
    assert dkd.MODEL.TEACHER.CONFIG_FILE == "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml"
    assert "mask_rcnn_R_101_FPN_3x/138205316/" in dkd.MODEL.TEACHER.WEIGHTS


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_opts, mask_teacher_opts):
    """A 2-iteration tools/train_net.py run of the Mask R-CNN DKD config (Mask R-CNN teacher):
    its output folder and stdout."""
    out = str(tmp_path_factory.mktemp("mask_dkd"))
    run = run_tool(
        "train_net.py",
        "--config-file",
        MASK_DKD_R18,
        *TINY,
        *mask_teacher_opts,
        *dataset_opts,
        "OUTPUT_DIR",
        out,
        "SOLVER.MAX_ITER",
        "2",
        "TEST.DETECTIONS_PER_IMAGE",
        "20",  # the final evaluation's time (every mask is encoded)
    )
    assert run.returncode == 0, run.stdout[-3000:]
    return out, run.stdout


@pytest.mark.slow
def test_train_net_trains_a_mask_student_with_dkd_and_reports_box_and_mask_ap(trained):
    out, stdout = trained
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    last = [r for r in records if "total_loss" in r][-1]
    assert last["iteration"] == 1
    assert math.isfinite(last["loss_dkd"]) and math.isfinite(last["loss_mask"])
    # The final evaluation: COCO box and mask AP (the student detects: AP is a number).
    final = records[-1]
    for task in ("bbox", "segm"):
        assert f"{task}/AP" in final and f"{task}/AP50" in final, final.keys()
        assert f"copypaste: Task: {task}" in stdout
    with open(os.path.join(out, "inference", "tiny_val", "coco_instances_results.json")) as f:
        results = json.load(f)
    assert results and all("segmentation" in r for r in results)


# ---- the exports ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mask_student(trained, tmp_path_factory):
    """The distilled student of ``trained`` with masks that have a shape: after 2 iterations its
    mask predictor (initialised with std 0.001) still says about 0.5 everywhere, so its weights
    are redrawn with std 0.05 (probabilities about 0.45 to 0.65). In a folder of its own, beside
    the training config (the export compares its preprocessing with it)."""
    import shutil

    out, _ = trained
    folder = tmp_path_factory.mktemp("mask_student")
    shutil.copy(os.path.join(out, "config.yaml"), folder / "config.yaml")
    checkpoint = torch.load(os.path.join(out, "model_final.pth"))
    weight = checkpoint["model"]["roi_heads.mask_head.predictor.weight"]
    g = torch.Generator().manual_seed(0)
    weight.copy_(torch.randn(weight.shape, generator=g) * 0.05)
    torch.save(checkpoint, folder / "model_final.pth")
    return str(folder / "model_final.pth")


@pytest.mark.slow
def test_exported_mask_student_gives_the_same_boxes_and_masks_in_vanilla_detectron2(
    mask_student, dataset_opts, tiny_data, tmp_path, monkeypatch
):
    weights = mask_student
    exported = str(tmp_path / "exported")
    tool = load_tool("export_student.py")
    monkeypatch.setattr(tool, "setup_logger", lambda *a, **k: None)
    argv = ["--config-file", MASK_DKD_R18, "--weights", weights, "--output", exported]
    assert tool.main(argv + [*TINY, *NO_TEACHER, *dataset_opts]) == 0
    assert "MASK_ON: true" in open(os.path.join(exported, "config.yaml")).read()

    images = [
        os.path.join(tiny_data["val"][1], n) for n in sorted(os.listdir(tiny_data["val"][1]))[:2]
    ]
    vanilla = vanilla_predictions(
        os.path.join(exported, "config.yaml"),
        images,
        tmp_path,
        ("pred_boxes", "scores", "pred_classes", "pred_masks"),
        check="model.roi_heads.mask_on",
    )

    from dkd_det.engine import Predictor

    torch.set_num_threads(2)
    cfg = make_cfg(MASK_DKD_R18, *NO_TEACHER, *dataset_opts, "MODEL.WEIGHTS", weights)
    predictor = Predictor(cfg)
    for path, (boxes, scores, classes, masks) in zip(images, vanilla):
        inst = predictor(cv2.imread(path))["instances"]
        assert len(inst) > 0 and masks.shape == (len(inst), 96, 96) and masks.dtype == torch.bool
        # Same weights, same code path, same thread count: bit-identical, masks included.
        assert torch.equal(inst.pred_boxes.tensor, boxes)
        assert torch.equal(inst.scores, scores)
        assert torch.equal(inst.pred_classes, classes)
        assert torch.equal(inst.pred_masks, masks)
        assert masks.any() and not masks.all()


def _mask_detections(masks, boxes):
    from dkd_det.export import Detections

    n = len(boxes)
    return Detections(
        torch.tensor(boxes).float(), torch.full((n,), 0.9), torch.zeros(n).long(), masks
    )


def test_check_compares_masks_by_iou_of_the_pasted_masks():
    from dkd_det.export import Tolerances, compare_detections

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 1, 28, 28, generator=g)
    boxes = [[2, 2, 40, 40], [30, 10, 90, 60]]
    ref = _mask_detections(masks, boxes)
    tol = Tolerances()
    stats, problems = compare_detections(ref, ref, tol, 0.05, 100, image_size=(96, 96))
    assert problems == [] and stats["matched"] == 2 and stats["min_mask_iou"] == 1.0
    # The second mask's left half off: its IoU is about one half, and it is named.
    changed = masks.clone()
    changed[1, 0, :, :14] = 0
    stats, problems = compare_detections(
        ref, _mask_detections(changed, boxes), tol, 0.05, 100, image_size=(96, 96)
    )
    assert 0.3 < stats["min_mask_iou"] < 0.7 and len(problems) == 1
    assert "box [30.00, 10.00, 90.00, 60.00]: mask IoU 0." in problems[0]
    # An export that lost the masks is named as such.
    _, problems = compare_detections(ref, ref._replace(masks=None), tol, 0.05, 100)
    assert problems == ["the PyTorch student predicts masks, the export none"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_deploy_export_of_a_mask_student_carries_and_checks_its_masks(
    fmt, mask_student, tiny_data, tmp_path, monkeypatch, capsys
):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    from dkd_det.engine import load_student
    from dkd_det.export import DeployedModel, pytorch_detections, sample_inputs

    weights = mask_student
    tool = load_tool("export_student.py")
    monkeypatch.setattr(tool, "setup_logger", lambda *a, **k: None)
    val = os.path.join(tiny_data["val"][1], sorted(os.listdir(tiny_data["val"][1]))[0])
    few = ["TEST.DETECTIONS_PER_IMAGE", "10"]  # the check's time
    argv = ["--config-file", MASK_DKD_R18, "--weights", weights, "--output", str(tmp_path)]
    argv += ["--check-images", val, "--format", fmt, *TINY, *NO_TEACHER, *few]
    torch.set_num_threads(2)
    assert tool.main(argv) == 0
    check = capsys.readouterr().out.splitlines()[-1]
    # the image, a random one, the image shrunk 0.3x
    assert check.startswith("check: 3 images") and "min mask IoU " in check, check
    info = json.loads((tmp_path / "deploy.json").read_text())
    assert "pred_masks" in info["outputs"] and "pasted" in info["output_masks"]
    assert info["check"]["min_mask_iou"] >= 0.99 and info["check"]["tolerances"]["mask_iou"] == 0.99

    cfg = make_cfg(MASK_DKD_R18, *NO_TEACHER, *few, "MODEL.WEIGHTS", weights)
    model = load_student(cfg)
    deployed = DeployedModel(str(tmp_path))
    for _, image in sample_inputs(cfg, [val], shrink=None)[:1]:
        ref, got = pytorch_detections(model, image), deployed(image)
        assert len(ref.scores) > 0 and ref.masks.shape == (len(ref.scores), 1, 28, 28)
        assert (ref.masks > 0.5).any() and (ref.masks < 0.5).any()  # not a trivial mask
        torch.testing.assert_close(got.masks, ref.masks, rtol=0, atol=1e-4)


# ---- the demo -------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_draws_the_masks_of_a_mask_rcnn(tmp_path, tiny_data):
    """One detection whose mask fills its box (mask logits +6): the demo's picture is coloured
    inside the box, where a drawing of the box alone leaves the image about as it was."""
    from detectron2.checkpoint import DetectionCheckpointer

    from dkd_det.data import dataset_metadata
    from dkd_det.engine import Predictor

    one = ["TEST.DETECTIONS_PER_IMAGE", "1", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    cfg = make_cfg(MASK_R18, *one)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.roi_heads.mask_head.predictor.bias.fill_(6.0)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    weights = str(tmp_path / "model_final.pth")
    val = os.path.join(tiny_data["val"][1], sorted(os.listdir(tiny_data["val"][1]))[0])
    image = str(tmp_path / "photo.png")  # 4x: the label covers less of the box
    cv2.imwrite(image, cv2.resize(cv2.imread(val), (384, 384), interpolation=cv2.INTER_CUBIC))
    out = tmp_path / "drawn.png"
    run = run_tool(
        "demo.py",
        "--config-file",
        MASK_R18,
        "--input",
        image,
        "--output",
        str(out),
        "--confidence-threshold",
        "0.0",
        "--opts",
        *TINY,
        *one,
        "MODEL.WEIGHTS",
        weights,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    original, drawn = cv2.imread(image), cv2.imread(str(out))
    assert drawn.shape == original.shape

    from detectron2.utils.visualizer import ColorMode, Visualizer

    inst = Predictor(make_cfg(MASK_R18, *one, "MODEL.WEIGHTS", weights))(original)["instances"]
    assert len(inst) == 1 and inst.has("pred_masks")
    x0, y0, x1, y1 = inst.pred_boxes.tensor[0].round().int().tolist()
    inside = np.zeros(original.shape[:2], bool)
    inside[y0 + 8 : y1 - 8, x0 + 8 : x1 - 8] = True
    inside &= inst.pred_masks[0].numpy()
    assert inside.sum() > 500

    def changed(picture):  # mean colour change inside the mask, 0-255
        return np.abs(picture.astype(int) - original.astype(int))[inside].mean()

    inst.remove("pred_masks")
    metadata = dataset_metadata(cfg, MASK_R18)
    boxes_only = Visualizer(original[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
    boxes_only = boxes_only.draw_instance_predictions(inst).get_image()[:, :, ::-1]
    # matplotlib's rendering moves every pixel a little (about 7 of 255 here); a mask's blend
    # moves them by tens.
    assert changed(drawn) > 3 * changed(boxes_only), (changed(drawn), changed(boxes_only))
