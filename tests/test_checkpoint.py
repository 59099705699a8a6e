"""dkd_det.checkpoint: atomic checkpoints, files that are not checkpoints named by every
loader, a model-zoo .pkl teacher loaded strictly, the torchvision converters."""

import os
import pickle

import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from dkd_det.checkpoint import AtomicCheckpointer
from dkd_det.engine import Trainer

from helpers import (
    DKD_R18,
    R18,
    make_cfg,
    randomise_bn,
    run_tool,
)


def test_last_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    """A write interrupted before the rename leaves the previous tag intact, and no temporary
    file (dkd_det.files.open_whole, which every whole-file write of dkd-det goes through)."""
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
    assert not (tmp_path / "last_checkpoint.tmp").exists()
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


@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 50])
def test_converted_torchvision_resnet_reproduces_its_stages(depth, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    torch.manual_seed(depth)
    tv = getattr(torchvision.models, f"resnet{depth}")().eval()
    randomise_bn(tv)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    pkl = str(tmp_path / f"R-{depth}-torchvision.pkl")
    run = run_tool(
        "convert_torchvision_to_d2.py",
        "--arch",
        f"resnet{depth}",
        pkl,
        "--from-state-dict",
        str(tmp_path / "tv.pth"),
    )
    assert run.returncode == 0, run.stdout[-3000:]
    with open(pkl, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "torchvision" and data["matching_heuristics"] is True
    assert not any(k.startswith("fc.") for k in data["model"])

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    DetectionCheckpointer(backbone).load(pkl)

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours = backbone(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i in range(1, 5):
            y = getattr(tv, f"layer{i}")(y)
            torch.testing.assert_close(ours[f"res{i + 1}"], y, rtol=1e-4, atol=1e-4)

    if (
        depth == 18
    ):  # the very file configs/COCO/faster_rcnn_r18_fpn.yaml expects, in its whole detector
        from detectron2.modeling import build_model

        model = build_model(make_cfg(R18))
        DetectionCheckpointer(model).load(pkl)
        for name, value in backbone.state_dict().items():
            torch.testing.assert_close(
                model.backbone.bottom_up.state_dict()[name], value, rtol=0, atol=0
            )


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, weights", [("resnet18", "ResNet18_Weights"), ("mobilenet_v2", "MobileNet_V2_Weights")]
)
def test_converter_offline_fails_clearly(tmp_path, arch, weights):
    # An empty cache and an unreachable proxy: no download, online or not.
    proxy = "http://127.0.0.1:9"
    env = {
        "TORCH_HOME": str(tmp_path / "torch"),
        "https_proxy": proxy,
        "HTTPS_PROXY": proxy,
        "http_proxy": proxy,
        "HTTP_PROXY": proxy,
    }
    run = run_tool(
        "convert_torchvision_to_d2.py", "--arch", arch, str(tmp_path / "out.pkl"), env=env
    )
    assert run.returncode != 0
    assert f"Could not download torchvision's {weights}.IMAGENET1K_V1" in run.stdout
    assert "--from-state-dict FILE" in run.stdout
    assert "Traceback" not in run.stdout
    assert not (tmp_path / "out.pkl").exists()


def test_missing_r18_weights_name_the_converter(tmp_path, dataset_opts):
    from dkd_det.data import register_coco_format
    from dkd_det.engine import Trainer

    missing = str(tmp_path / "weights" / "R-18-torchvision.pkl")
    cfg = make_cfg(R18, *dataset_opts, "MODEL.WEIGHTS", missing, "OUTPUT_DIR", str(tmp_path))
    register_coco_format(cfg)
    trainer = Trainer(cfg)
    with pytest.raises(
        FileNotFoundError,
        match=r"convert_torchvision_to_d2\.py --arch resnet18 .*R-18-torchvision\.pkl",
    ):
        trainer.resume_or_load(resume=False)
