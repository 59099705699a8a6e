"""ReviewKD as a composable feature distillation term: ABF + HCL against direct float64
formulas, gradients to the student only, ABF modules trained but never exported, and the
COCO configs that combine it with DKD."""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.utils.events import EventStorage
from test_modeling import batch, count_calls

from dkd_det.config import student_cfg
from dkd_det.distill import DistillInputs, ReviewKD
from dkd_det.engine import load_student
from dkd_det.export import export_student
from dkd_det.losses import hcl_loss

from helpers import DKD_R18, ROOT, TINY, make_cfg, train_net_here

COCO = os.path.join(ROOT, "configs", "COCO")
REVIEWDKD_R18 = os.path.join(COCO, "reviewdkd_r101_r18.yaml")
NEW_CONFIGS = ["reviewdkd_r101_r18", "reviewdkd_r101_r50", "reviewdkd_r50_mv2", "reviewkd_r101_r18"]


# ---- direct float64 implementations of the paper's formulas -------------------------------


def _pool(x, k):
    """Adaptive average pooling to (k, k) by its definition: bin i of n covers
    [floor(i n / k), ceil((i + 1) n / k))."""
    h, w = x.shape[-2:]
    rows = []
    for i in range(k):
        r0, r1 = (i * h) // k, math.ceil((i + 1) * h / k)
        cols = []
        for j in range(k):
            c0, c1 = (j * w) // k, math.ceil((j + 1) * w / k)
            cols.append(x[..., r0:r1, c0:c1].mean(dim=(-2, -1)))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def _hcl_reference(students, teachers, scales):
    total = 0.0
    for f_s, f_t in zip(students, teachers):
        terms, weights = [((f_s - f_t) ** 2).mean()], [1.0]
        for k in scales:
            if k < min(f_s.shape[-2:]):
                weights.append(weights[-1] / 2 if len(weights) > 1 else 0.5)
                terms.append(((_pool(f_s, k) - _pool(f_t, k)) ** 2).mean())
        total = total + sum(w * t for w, t in zip(weights, terms)) / sum(weights)
    return total


def _nearest(x, size):
    """Nearest upsampling by index: output pixel i reads input floor(i * in / out)."""
    h, w = x.shape[-2:]
    rows = torch.tensor([(i * h) // size[0] for i in range(size[0])])
    cols = torch.tensor([(j * w) // size[1] for j in range(size[1])])
    return x[..., rows, :][..., cols]


def _abf_reference(abf, x, residual):
    """One ABF block (no norm) from its weights: 1x1 conv, attention fusion, 3x3 conv."""
    x = F.conv2d(x, abf.conv1.weight, abf.conv1.bias)
    if residual is not None:
        residual = _nearest(residual, x.shape[-2:])
        z = torch.cat([x, residual], 1)
        logits = torch.einsum("oc,nchw->nohw", abf.att_conv.weight[:, :, 0, 0], z)
        att = 1 / (1 + torch.exp(-(logits + abf.att_conv.bias.view(1, 2, 1, 1))))
        x = x * att[:, :1] + residual * att[:, 1:]
    return F.conv2d(x, abf.conv2.weight, abf.conv2.bias, padding=1), x


def test_hcl_matches_float64_formula():
    g = torch.Generator().manual_seed(0)
    # p2-like to p6-like sizes, one landscape, one too small for scale 4, one too small for 2
    shapes = [(2, 5, 17, 23), (2, 5, 9, 12), (2, 5, 5, 6), (2, 5, 3, 4), (2, 5, 2, 2)]
    students = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    teachers = [torch.randn(s, generator=g, dtype=torch.float64) * 2 + 0.5 for s in shapes]
    want = _hcl_reference(students, teachers, (4, 2, 1))
    got = hcl_loss([s.float() for s in students], [t.float() for t in teachers], (4, 2, 1))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # other scales, and gradients reach the student only
    s = [x.float().requires_grad_(True) for x in students]
    t = [x.float().requires_grad_(True) for x in teachers]
    got = hcl_loss(s, t, (3, 1))
    torch.testing.assert_close(got.double(), _hcl_reference(students, teachers, (3, 1)))
    got.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)


def test_reviewkd_abf_and_loss_match_float64_formulas():
    levels = ["p2", "p3", "p4", "p5", "p6"]
    c_s, c_t, mid = 6, 5, 4
    term = ReviewKD(
        in_features=levels,
        student_channels=[c_s] * 5,
        teacher_channels=[c_t] * 5,
        mid_channels=mid,
        norm="",
        pool_scales=(4, 2, 1),
        loss_weight=1.2,
    ).double()
    g = torch.Generator().manual_seed(1)
    for p in term.parameters():  # non-trivial biases and attention
        p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    sizes = [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]
    student = {
        f: torch.randn(2, c_s, *hw, generator=g, dtype=torch.float64)
        for f, hw in zip(levels, sizes)
    }
    teacher = {
        f: torch.randn(2, c_t, *hw, generator=g, dtype=torch.float64)
        for f, hw in zip(levels, sizes)
    }

    fused, residual = [None] * 5, None
    for i in reversed(range(5)):
        fused[i], residual = _abf_reference(term.abfs[i], student[levels[i]], residual)
    for got, want in zip(term.fuse(student), fused):
        torch.testing.assert_close(got, want)
    assert term.abfs[4].att_conv is None and all(a.att_conv is not None for a in term.abfs[:4])
    want = 1.2 * _hcl_reference(fused, [teacher[f] for f in levels], (4, 2, 1))
    losses = term(DistillInputs(None, student, teacher, []))
    assert set(losses) == {"loss_reviewkd"}
    torch.testing.assert_close(losses["loss_reviewkd"].double(), want, rtol=1e-5, atol=1e-7)


# ---- in the model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reviewdkd(dkd_opts):
    torch.manual_seed(0)
    return build_model(make_cfg(REVIEWDKD_R18, *dkd_opts))


def test_level_set_and_registry(reviewdkd, dkd_opts):
    term = reviewdkd.distill_terms["reviewkd"]
    assert isinstance(term, ReviewKD) and list(reviewdkd.distill_terms) == ["dkd", "reviewkd"]
    assert term.in_features == ["p2", "p3", "p4", "p5", "p6"]
    assert term.loss_weight == 1.2 and term.pool_scales == (4, 2, 1)
    # training-only parameters are the student's to optimise (and DDP's to synchronise)
    ids = {id(p) for p in reviewdkd.parameters()}
    assert all(id(p) in ids for p in term.parameters())
    # the feature term composes with any logit term, or none, from any config, by overrides
    for terms in (["KD", "REVIEWKD"], ["REVIEWKD"]):
        model = build_model(make_cfg(DKD_R18, *dkd_opts, "MODEL.DISTILL.TERMS", repr(terms)))
        assert isinstance(model.distill_terms["reviewkd"], ReviewKD) and model.teacher is not None
        assert list(model.distill_terms) == [t.lower() for t in terms]
    # the student alone has neither teacher nor ABF
    alone = build_model(student_cfg(make_cfg(REVIEWDKD_R18, *dkd_opts)))
    assert alone.teacher is None and len(alone.distill_terms) == 0


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.DISTILL.TERMS", "['DKD', 'FITNET']"], "\\['FITNET'\\] not registered"),
        (["MODEL.DISTILL.REVIEWKD.IN_FEATURES", "['p2', 'res4']"], "has no \\['res4'\\]"),
        (["MODEL.DISTILL.REVIEWKD.LOSS_WEIGHT", "-1.0"], "REVIEWKD.LOSS_WEIGHT"),
    ],
)
def test_clear_errors(dkd_opts, opts, match):
    with pytest.raises(ValueError, match=match):
        build_model(make_cfg(REVIEWDKD_R18, *dkd_opts, *opts))


def test_one_teacher_backbone_pass_and_loss_names(reviewdkd, dkd_opts):
    backbone = count_calls(reviewdkd.teacher.backbone)
    head = count_calls(reviewdkd.teacher.roi_heads.box_head)
    reviewdkd.train()
    with EventStorage(0):
        losses = reviewdkd(batch())
    assert {"loss_dkd", "loss_reviewkd", "loss_cls", "loss_rpn_cls"} <= set(losses)
    assert (len(backbone), len(head)) == (1, 1)
    assert all(torch.isfinite(v) for v in losses.values())

    alone = build_model(make_cfg(os.path.join(COCO, "reviewkd_r101_r18.yaml"), *dkd_opts))
    head = count_calls(alone.teacher.roi_heads.box_head)
    alone.train()
    with EventStorage(0):
        losses = alone(batch())
    assert "loss_reviewkd" in losses and "loss_dkd" not in losses and "loss_kd" not in losses
    assert len(head) == 0  # no logit term: the teacher's box head never runs


def test_gradients_reach_student_fpn_and_backbone_never_teacher(reviewdkd):
    model = reviewdkd
    model.train()
    model.zero_grad(set_to_none=True)
    with EventStorage(0):
        losses = model(batch())
    losses["loss_reviewkd"].backward()
    fpn = model.backbone
    assert fpn.fpn_lateral2.weight.grad.abs().sum() > 0  # student FPN
    assert fpn.bottom_up.res3[0].conv1.weight.grad.abs().sum() > 0  # student backbone (res2 frozen)
    assert model.roi_heads.box_predictor.cls_score.weight.grad is None  # features only
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.distill_terms.parameters()
    )
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.zero_grad(set_to_none=True)


def _train(model, steps=2):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001)
    model.train()
    for step in range(steps):
        with EventStorage(step):
            losses = model(batch(seed=step))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return model.eval()


def _same_outputs(a, b):
    inputs = [{"image": x["image"]} for x in batch(seed=7)]
    with torch.no_grad():
        ours, theirs = a(inputs), b(inputs)
    for x, y in zip(ours, theirs):
        x, y = x["instances"], y["instances"]
        assert len(x) > 0
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        assert torch.equal(x.scores, y.scores) and torch.equal(x.pred_classes, y.pred_classes)


def test_export_drops_abf_and_loads_in_vanilla_detectron2(dkd_opts, tmp_path):
    cfg = make_cfg(REVIEWDKD_R18, *dkd_opts, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    torch.manual_seed(0)
    trained = _train(build_model(cfg))
    abf_before = copy.deepcopy(trained.distill_terms.state_dict())
    assert any(k.startswith("distill_terms.") for k in trained.state_dict())

    # 1. the training checkpoint (with ABF, for --resume) -> load_student -> export, as the tool
    DetectionCheckpointer(trained, save_dir=str(tmp_path)).save("model_final")
    ckpt = str(tmp_path / "model_final.pth")
    assert any(k.startswith("distill_terms.") for k in torch.load(ckpt)["model"])
    student = load_student(cfg, ckpt)
    assert type(student).__name__ == "DistillationRCNN" and len(student.distill_terms) == 0
    # 2. export_student given the training model itself drops the ABF keys as well
    for name, model in (("via_load_student", student), ("direct", trained)):
        out = str(tmp_path / name)
        paths = export_student(student_cfg(cfg), model, out)
        state = torch.load(paths["weights"])["model"]
        assert not any("distill_terms" in k or "abf" in k for k in state)
        vcfg = get_cfg()  # vanilla detectron2: no dkd-det keys
        vcfg.merge_from_file(paths["config"])
        vanilla = build_model(vcfg)
        assert type(vanilla) is GeneralizedRCNN
        incompatible = DetectionCheckpointer(vanilla)._load_model({"model": state})
        assert not (incompatible.missing_keys or incompatible.unexpected_keys)
        vanilla.eval()
        _same_outputs(trained, vanilla)  # the trained student in eval mode, ABF unused
    assert all(torch.equal(v, trained.distill_terms.state_dict()[k]) for k, v in abf_before.items())


# ---- the configs, end to end -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_new_configs_train_two_iterations(name, tmp_path, dkd_opts, dataset_opts):
    out = str(tmp_path / name)
    train_net_here(
        "--config-file",
        os.path.join(COCO, f"{name}.yaml"),
        *TINY,
        *dkd_opts,
        *dataset_opts,
        "OUTPUT_DIR",
        out,
        "SOLVER.MAX_ITER",
        "2",
    )
    with open(os.path.join(out, "metrics.json")) as f:
        last = [r for r in map(json.loads, f) if "total_loss" in r][-1]
    assert last["iteration"] == 1 and math.isfinite(last["loss_reviewkd"])
    assert ("loss_dkd" in last) == name.startswith("reviewdkd")
    state = torch.load(os.path.join(out, "model_final.pth"))["model"]
    assert any(
        k.startswith("distill_terms.reviewkd.abfs.4.") for k in state
    )  # p6's ABF, for --resume
