"""The MobileNetV2 backbone and its FPN: shapes, torchvision weight conversion, norms and
freezing, and a DKD run of the R-50 -> MobileNetV2 pair through tools/train_net.py."""

import json
import math
import os
import pickle

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model
from detectron2.structures import ImageList

from dkd_det.checkpoint import missing_weights_hint, resolve_weights
from dkd_det.config import get_dkd_cfg
from dkd_det.modeling import MobileNetV2

from helpers import R50, ROOT, TINY, make_cfg, randomise_bn, run_tool, save_random_model

MV2 = os.path.join(ROOT, "configs/COCO/faster_rcnn_mv2_fpn.yaml")
DKD_MV2 = os.path.join(ROOT, "configs/COCO/dkd_r50_mv2.yaml")
ALL = ["m2", "m3", "m4", "m5", "last"]
# Output -> (index of the torchvision block it follows, stride, channels).
EXPECTED = {
    "m2": (3, 4, 24),
    "m3": (6, 8, 32),
    "m4": (13, 16, 96),
    "m5": (17, 32, 320),
    "last": (18, 32, 1280),
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("size", [(64, 64), (97, 130), (33, 200)])
def test_backbone_outputs_have_ceil_divided_shapes(size):
    backbone = MobileNetV2(out_features=ALL).eval()
    shapes = backbone.output_shape()
    assert {k: (s.stride, s.channels) for k, s in shapes.items()} == {
        k: (s, c) for k, (_, s, c) in EXPECTED.items()
    }
    h, w = size
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, h, w))
    assert list(out) == ALL
    for name, y in out.items():
        stride = shapes[name].stride
        assert tuple(y.shape) == (
            2,
            shapes[name].channels,
            math.ceil(h / stride),
            math.ceil(w / stride),
        ), name


def test_fpn_on_a_padded_image_list():
    """As GeneralizedRCNN feeds it: raw sizes, padded to the FPN's size_divisibility."""
    cfg = make_cfg(MV2)
    fpn = build_backbone(cfg).eval()
    assert fpn.size_divisibility == 32
    images = ImageList.from_tensors(
        [torch.randn(3, 97, 130), torch.randn(3, 64, 80)], fpn.size_divisibility
    )
    assert tuple(images.tensor.shape[-2:]) == (128, 160)
    with torch.no_grad():
        out = fpn(images.tensor)
    shapes = fpn.output_shape()
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"] == list(cfg.MODEL.RPN.IN_FEATURES)
    assert [shapes[k].stride for k in out] == [4, 8, 16, 32, 64]
    for name, y in out.items():
        s = shapes[name].stride
        assert tuple(y.shape) == (
            2,
            cfg.MODEL.FPN.OUT_CHANNELS,
            math.ceil(128 / s),
            math.ceil(160 / s),
        ), name  # p6: 160 / 64


@pytest.mark.slow
def test_converted_torchvision_mobilenet_v2_reproduces_its_features(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2(weights=None).eval()
    randomise_bn(tv)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    pkl = str(tmp_path / "MobileNetV2-torchvision.pkl")
    run = run_tool(
        "convert_torchvision_to_d2.py",
        "--arch",
        "mobilenet_v2",
        pkl,
        "--from-state-dict",
        str(tmp_path / "tv.pth"),
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert "build_mobilenet_v2_fpn_backbone" in run.stdout
    with open(pkl, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "torchvision" and data["matching_heuristics"] is True
    assert not any(k.startswith("classifier.") for k in data["model"])

    backbone = MobileNetV2(out_features=ALL, norm="FrozenBN", freeze_at=0).eval()
    assert set(data["model"]) == set(backbone.state_dict())
    DetectionCheckpointer(backbone).load(pkl)

    x = torch.randn(2, 3, 97, 130)
    with torch.no_grad():
        ours = backbone(x)
        y, want = x, {}
        for i, block in enumerate(tv.features):
            y = block(y)
            want[i] = y
    for name, (index, _, _) in EXPECTED.items():
        torch.testing.assert_close(ours[name], want[index], rtol=1e-4, atol=1e-4, msg=name)

    # The very file configs/COCO/faster_rcnn_mv2_fpn.yaml expects, in its whole detector: every
    # backbone weight loaded (the unused features.18 is only reported).
    model = build_model(make_cfg(MV2))
    DetectionCheckpointer(model).load(pkl)
    loaded = model.backbone.bottom_up.state_dict()
    assert len(loaded) == len([k for k in data["model"] if not k.startswith("features.18.")])
    for name, value in loaded.items():
        torch.testing.assert_close(value, backbone.state_dict()[name], rtol=0, atol=0)


@pytest.mark.slow
def test_converter_rejects_another_architecture(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    run = run_tool(
        "convert_torchvision_to_d2.py",
        "--arch",
        "mobilenet_v2",
        str(tmp_path / "x.pkl"),
        "--from-state-dict",
        str(tmp_path / "r18.pth"),
    )
    assert run.returncode != 0
    assert "are not torchvision's mobilenet_v2" in run.stdout and "Traceback" not in run.stdout
    assert not (tmp_path / "x.pkl").exists()


def test_missing_weights_name_the_converter(tmp_path, monkeypatch):
    hint = missing_weights_hint("weights/MobileNetV2-torchvision.pkl")
    assert (
        "convert_torchvision_to_d2.py --arch mobilenet_v2 weights/MobileNetV2-torchvision.pkl"
        in hint
    )
    assert "convert_torchvision_to_d2.py --arch resnet18 " in missing_weights_hint(
        "x/R-18-torchvision.pkl"
    )
    assert missing_weights_hint("weights/other.pkl") == ""
    # The MobileNetV2 config's own initialisation, where it is missing, names that converter.
    own = get_dkd_cfg(MV2).MODEL.WEIGHTS
    monkeypatch.chdir(tmp_path)  # a checkout without weights/
    with pytest.raises(FileNotFoundError, match="--arch mobilenet_v2 " + own):
        resolve_weights(own, "MODEL.WEIGHTS")


@pytest.mark.parametrize("norm, freeze_at", [("BN", 2), ("FrozenBN", 0), ("SyncBN", 3)])
def test_norms_and_frozen_stages(norm, freeze_at):
    cfg = make_cfg(MV2, "MODEL.MOBILENET.NORM", norm, "MODEL.BACKBONE.FREEZE_AT", str(freeze_at))
    backbone = BACKBONE_REGISTRY.get("build_mobilenet_v2_backbone")(cfg, ShapeSpec(channels=3))
    frozen_blocks = {0: 0, 2: 4, 3: 7}[freeze_at]  # stem = features.0-1, m2 = 2-3, m3 = 4-6
    trainable_norm = {
        "BN": torch.nn.BatchNorm2d,
        "FrozenBN": FrozenBatchNorm2d,
        "SyncBN": torch.nn.SyncBatchNorm,
    }[norm]
    assert len(backbone.features) == 18  # up to m5: features.18 is not built
    for i, block in enumerate(backbone.features):
        frozen = i < frozen_blocks
        params = list(block.parameters())
        norms = [
            m
            for m in block.modules()
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm, FrozenBatchNorm2d))
        ]
        assert norms
        if frozen:
            assert all(not p.requires_grad for p in params), i
            assert all(type(m) is FrozenBatchNorm2d for m in norms), i
        else:
            assert all(type(m) is trainable_norm for m in norms), i
            assert params and all(p.requires_grad for p in params), i


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.MOBILENET.OUT_FEATURES", "['m2', 'res3']"], r"each must be one of"),
        (
            ["MODEL.MOBILENET.OUT_FEATURES", "['m2', 'm3']", "MODEL.BACKBONE.FREEZE_AT", "4"],
            r"freeze_at=4: must be in \[0, 3\]",
        ),
        (
            ["MODEL.MOBILENET.OUT_FEATURES", "['m2', 'm3', 'm4']"],
            r"MODEL.FPN.IN_FEATURES .* asks for \['m5'\]",
        ),
    ],
)
def test_bad_options_are_clear_errors(opts, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(make_cfg(MV2, *opts))


def test_fpn_on_the_last_1280_channel_output():
    cfg = make_cfg(
        MV2,
        "MODEL.MOBILENET.OUT_FEATURES",
        "['m2', 'm3', 'm4', 'last']",
        "MODEL.FPN.IN_FEATURES",
        "['m2', 'm3', 'm4', 'last']",
    )
    fpn = build_backbone(cfg)
    assert fpn.bottom_up.output_shape()["last"] == ShapeSpec(channels=1280, stride=32)
    assert [s.stride for s in fpn.output_shape().values()] == [4, 8, 16, 32, 64]


@pytest.mark.slow
def test_dkd_r50_to_mobilenet_v2_trains(tmp_path, dataset_opts):
    """The paper's R-50 -> MobileNetV2 pair, tiny and offline: a random-init R-50 teacher
    (BGR, caffe-style) distilled into the MobileNetV2-FPN student (RGB, ImageNet-style)."""
    teacher = save_random_model(make_cfg(R50), str(tmp_path / "r50.pth"))
    out = str(tmp_path / "out")
    run = run_tool(
        "train_net.py",
        "--config-file",
        DKD_MV2,
        *TINY,
        *dataset_opts,
        "MODEL.TEACHER.CONFIG_FILE",
        R50,
        "MODEL.TEACHER.OPTS",
        repr(TINY),
        "MODEL.TEACHER.WEIGHTS",
        teacher,
        "OUTPUT_DIR",
        out,
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.CHECKPOINT_PERIOD",
        "100",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:]
    with open(os.path.join(out, "metrics.json")) as f:
        last = [r for r in map(json.loads, f) if "total_loss" in r][-1]
    assert last["iteration"] == 1
    assert {"loss_dkd", "dkd/tckd", "dkd/nckd", "loss_cls", "loss_box_reg"} <= set(last)
    assert all(math.isfinite(last[k]) for k in ("loss_dkd", "total_loss"))
    state = torch.load(os.path.join(out, "model_final.pth"))["model"]
    assert "backbone.bottom_up.features.17.project.weight" in state
    assert not any("teacher" in k for k in state)
