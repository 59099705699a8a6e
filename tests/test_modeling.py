"""The distillation model: one student box-head pass, a frozen teacher outside the
checkpoint, inference identical to vanilla detectron2, clear errors before training."""

import copy
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from dkd_det.distill import DistillInputs

from helpers import DKD_R18, R18, R50, TEACHER_OPTS, TINY, batch, make_cfg, save_random_model


@pytest.fixture(scope="module")
def model(dkd_opts):
    torch.manual_seed(0)
    return build_model(make_cfg(DKD_R18, *dkd_opts))


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_one_student_box_head_pass_and_no_teacher_rpn(model):
    student_head = count_calls(model.roi_heads.box_head)
    teacher_head = count_calls(model.teacher.roi_heads.box_head)
    teacher_rpn = count_calls(model.teacher.proposal_generator)
    model.train()
    with EventStorage(0) as storage:
        losses = model(batch())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_dkd"}
    assert (len(student_head), len(teacher_head), len(teacher_rpn)) == (1, 1, 0)
    assert {"dkd/tckd", "dkd/nckd"} <= set(storage.histories())
    assert all(torch.isfinite(v) for v in losses.values())


def test_teacher_is_frozen_and_gradients_reach_the_student_only(model):
    model.train()
    assert not model.teacher.training  # train() does not reach the teacher
    before = copy.deepcopy(model.teacher.state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for step in range(3):
        with EventStorage(step):
            losses = model(batch(seed=step))
        optimizer.zero_grad()
        losses["loss_dkd"].backward(retain_graph=True)
        assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.teacher.parameters())
        sum(losses.values()).backward()
        optimizer.step()
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert not any(p is q for p in model.parameters() for q in model.teacher.parameters())


def test_checkpoint_is_student_only_and_loads_into_vanilla_rcnn(model, tmp_path):
    assert not any("teacher" in k for k in model.state_dict())
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    vanilla_cfg = make_cfg(R18)  # the student's own config, without distillation
    vanilla = build_model(vanilla_cfg)
    assert type(vanilla) is GeneralizedRCNN
    assert set(vanilla.state_dict()) == set(model.state_dict())
    incompatible = DetectionCheckpointer(vanilla)._load_model(
        torch.load(tmp_path / "model_final.pth")
    )
    assert (
        not incompatible.missing_keys
        and not incompatible.unexpected_keys
        and not incompatible.incorrect_shapes
    )
    model.eval()
    vanilla.eval()
    inputs = [{"image": x["image"]} for x in batch(seed=7)]
    with torch.no_grad():
        ours, theirs = model(inputs), vanilla(inputs)
    for a, b in zip(ours, theirs):
        a, b = a["instances"], b["instances"]
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


def test_teacher_gets_its_own_channel_order_and_normalisation(tmp_path):
    """An RGB, ImageNet-std student (R-18) with a BGR, caffe-style teacher (R-50)."""
    weights = save_random_model(make_cfg(R50), str(tmp_path / "r50.pth"))
    model = build_model(
        make_cfg(
            DKD_R18,
            "MODEL.TEACHER.CONFIG_FILE",
            R50,
            "MODEL.TEACHER.OPTS",
            repr(TINY),
            "MODEL.TEACHER.WEIGHTS",
            weights,
        )
    )
    assert (model.input_format, model.teacher.input_format) == ("RGB", "BGR")
    rgb = batch(1)[0]["image"]
    got = model.teacher_features([{"image": rgb}])
    image = (
        rgb.flip(0) - torch.tensor([103.530, 116.280, 123.675]).view(3, 1, 1)
    ) / 1.0  # BGR, caffe mean, std 1; 96 px needs no padding
    want = model.teacher.backbone(image[None])
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k]) for k in got)


def test_plain_student_without_terms_builds_no_teacher():
    model = build_model(make_cfg(DKD_R18, "MODEL.DISTILL.TERMS", "[]"))
    assert model.teacher is None
    model.train()
    with EventStorage(0):
        assert "loss_dkd" not in model(batch())


def test_warmup_ramps_the_loss_weight(dkd_opts):
    from dkd_det.distill import DistillInputs

    model = build_model(make_cfg(DKD_R18, *dkd_opts, "MODEL.DISTILL.DKD.WARMUP_ITERS", "4"))
    z_s, z_t, t = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 4, (8,))
    inputs = DistillInputs(None, {}, {}, [], gt_classes=t, student_logits=z_s, teacher_logits=z_t)
    with EventStorage(0):
        first = model.distill_terms["dkd"](inputs)["loss_dkd"]
    with EventStorage(9):
        full = model.distill_terms["dkd"](inputs)["loss_dkd"]
    torch.testing.assert_close(first * 4, full)


@pytest.mark.parametrize(
    "opts, error, match",
    [
        (
            ["MODEL.TEACHER.OPTS", repr(TINY + ["MODEL.ROI_HEADS.NUM_CLASSES", "5"])],
            ValueError,
            "teacher predicts 5 classes",
        ),
        (
            ["MODEL.TEACHER.CONFIG_FILE", "COCO-Detection/retinanet_R_50_FPN_1x.yaml"],
            TypeError,
            "not a\\s+two-stage R-CNN",
        ),
        (
            ["MODEL.TEACHER.CONFIG_FILE", "no/such/teacher.yaml"],
            FileNotFoundError,
            "neither a file nor a detectron2 model-zoo",
        ),
        (["MODEL.TEACHER.CONFIG_FILE", ""], ValueError, "CONFIG_FILE is empty"),
        (["MODEL.TEACHER.WEIGHTS", ""], ValueError, "random"),
        (
            ["MODEL.TEACHER.WEIGHTS", "/no/such/teacher.pth"],
            FileNotFoundError,
            "MODEL.TEACHER.WEIGHTS",
        ),
        (["MODEL.DISTILL.TERMS", "['FITNET']"], ValueError, "MODEL.DISTILL.TERMS.*not registered"),
        (["MODEL.DISTILL.TERMS", "['DKD', 'dkd']"], ValueError, "listed twice"),
        (["MODEL.DISTILL.DKD.TEMPERATURE", "0.0"], ValueError, "DKD.TEMPERATURE"),
        (["MODEL.DISTILL.DKD.BETA", "-1.0"], ValueError, "DKD.BETA"),
        (["MODEL.DISTILL.DKD.LOSS_WEIGHT", "-1.0"], ValueError, "DKD.LOSS_WEIGHT"),
    ],
)
def test_clear_errors_before_training(teacher_weights, opts, error, match):
    with pytest.raises(error, match=match):
        build_model(
            make_cfg(DKD_R18, *TEACHER_OPTS, "MODEL.TEACHER.WEIGHTS", teacher_weights, *opts)
        )


def test_teacher_weights_of_another_architecture_name_the_keys(tmp_path):
    r50 = save_random_model(make_cfg(R50), str(tmp_path / "r50.pth"))
    with pytest.raises(
        ValueError,
        match=(
            "MODEL.TEACHER.WEIGHTS = .* does not match the model's architecture"
            ".*(unexpected keys|shape mismatches)"
        ),
    ):
        build_model(make_cfg(DKD_R18, *TEACHER_OPTS, "MODEL.TEACHER.WEIGHTS", r50))


def test_model_zoo_teacher_url_fails_clearly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached download
    # The teacher's classes made the student's: a class-count mismatch is refused first.
    opts = ["MODEL.TEACHER.OPTS", repr(TINY), "MODEL.TEACHER.WEIGHTS"]
    with pytest.raises(OSError, match="copy the file here and set MODEL.TEACHER.WEIGHTS"):
        build_model(make_cfg(DKD_R18, *opts, "https://127.0.0.1:9/no/model_final.pkl"))


@pytest.mark.parametrize(
    "switch, value, tol",
    [
        ("CHANNELS_LAST", "True", 1e-4),
        # dynamo's graph capture without a C++ compiler; a minute of tracing on the CPU
        pytest.param("COMPILE", "aot_eager", 1e-4, marks=pytest.mark.slow),
        ("DTYPE", "bfloat16", 0.1),  # bf16 keeps 8 bits of mantissa: ~1e-2 relative per op
    ],
)
def test_teacher_switches_keep_its_outputs(switch, value, tol, dkd_opts):
    """MODEL.TEACHER.{CHANNELS_LAST, COMPILE, DTYPE} change how the teacher runs, not what it
    computes: its features and box logits stay within ``tol`` (relative to their scale) of
    the float32 eager teacher's, and reach the terms as float32."""
    plain = build_model(make_cfg(DKD_R18, *dkd_opts))
    fast = build_model(make_cfg(DKD_R18, *dkd_opts, f"MODEL.TEACHER.{switch}", value))
    inputs = batch()
    boxes = [x["instances"].gt_boxes for x in inputs]
    with torch.no_grad():
        want = plain.teacher_features(inputs)
        got = fast.teacher_features(inputs)
        want_logits = plain.teacher_logits(want, boxes)
        got_logits = fast.teacher_logits(got, boxes)
    for k in want:
        assert got[k].dtype == torch.float32
        scale = want[k].abs().max()
        torch.testing.assert_close(got[k] / scale, want[k] / scale, atol=tol, rtol=0)
    assert got_logits.dtype == torch.float32
    scale = want_logits.abs().max()
    torch.testing.assert_close(got_logits / scale, want_logits / scale, atol=tol, rtol=0)


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


@pytest.mark.slow
def test_model_zoo_teacher_configs_need_no_pkg_resources():
    """setuptools >= 82 has no ``pkg_resources``, which ``detectron2.model_zoo`` imports: a
    teacher named by its model-zoo config (yaml or LazyConfig) still resolves and loads."""
    code = (
        "import sys; sys.modules['pkg_resources'] = None\n"  # import pkg_resources fails
        "from dkd_det.config import get_dkd_cfg\n"
        "from dkd_det.modeling.teacher import get_teacher_cfg\n"
        "cfg = get_dkd_cfg(sys.argv[1])\n"
        "for name in ('COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml',\n"
        "             'new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py'):\n"
        "    cfg.defrost(); cfg.MODEL.TEACHER.CONFIG_FILE = name\n"
        "    print(type(get_teacher_cfg(cfg)).__name__)\n"
        "assert 'detectron2.model_zoo' not in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, DKD_R18], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["CfgNode", "DictConfig"]
