"""The feature distillation terms PKD, CWD, FGD and MGD: each against a float64 formula written
here from its paper (loops and explicit sums, not the package's functions), gradients that
reach the student and the term's training-only modules but never the teacher, the channel
checks, the export of a student trained with each, and the COCO configs."""

import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from dkd_det.config import student_cfg
from dkd_det.distill import CWD, FGD, MGD, PKD, DistillInputs
from dkd_det.distill.feature_losses import fgd_masks, mgd_mask, pkd_loss
from dkd_det.engine import load_student
from dkd_det.export import export_student

from helpers import ROOT, TINY, batch, make_cfg, train_net_here

COCO = os.path.join(ROOT, "configs", "COCO")
TERMS = {"PKD": PKD, "CWD": CWD, "FGD": FGD, "MGD": MGD}
PAIRS = ["r101_r18", "r101_r50", "r50_mv2"]
CONFIGS = [f"{p}{t.lower()}_{pair}" for t in TERMS for pair in PAIRS for p in ("", "dkd")]
# The hyperparameters of each term's closest two-stage setting in its reference (see README).
PAPER = {
    "PKD": {"LOSS_WEIGHT": 6.0, "IN_FEATURES": ["p2", "p3", "p4", "p5"]},
    "CWD": {"LOSS_WEIGHT": 10.0, "TEMPERATURE": 1.0, "IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"]},
    "FGD": {
        "LOSS_WEIGHT": 1.0,
        "TEMPERATURE": 0.5,
        "ALPHA": 5e-5,
        "BETA": 2.5e-5,
        "GAMMA": 5e-5,
        "LAMBDA": 5e-7,
        "IN_FEATURES": ["p2", "p3", "p4", "p5"],
    },
    "MGD": {"LOSS_WEIGHT": 5e-7, "LAMBDA": 0.45, "IN_FEATURES": ["p2", "p3", "p4", "p5"]},
}


def _features(shapes, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return {
        f: torch.randn(s, generator=g, dtype=torch.float64) * scale + shift
        for f, s in shapes.items()
    }


def _randomise(module, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


# ---- PKD ---------------------------------------------------------------------------------


def _pearson_loss(s, t):
    """Mean over channels of 1 - r_c, r_c the Pearson correlation of channel c's N*H*W values."""
    total = 0.0
    for c in range(s.shape[1]):
        x, y = s[:, c].flatten(), t[:, c].flatten()
        x, y = x - x.sum() / x.numel(), y - y.sum() / y.numel()
        r = (x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum())
        total = total + (1 - r)
    return total / s.shape[1]


def test_pkd_is_one_minus_pearson_r_per_channel():
    shapes = {"p2": (2, 5, 12, 16), "p3": (2, 5, 6, 8)}
    teacher = _features(shapes, 0, scale=3.0, shift=2.0)
    noise = _features(shapes, 1)
    student = {f: 0.4 * teacher[f] + noise[f] for f in shapes}  # correlated, r well inside (0, 1)
    term = PKD(in_features=list(shapes), loss_weight=6.0)
    losses = term(DistillInputs(None, student, teacher, []))
    want = 6.0 * sum(_pearson_loss(student[f], teacher[f]) for f in shapes)
    assert set(losses) == {"loss_pkd"}
    torch.testing.assert_close(losses["loss_pkd"], want, rtol=1e-5, atol=0)
    assert 0.1 < want / 6.0 / 2 < 0.5  # 1 - r with r = 1.2 / sqrt(1.2^2 + 1), about 0.23
    # invariant to an affine map of either side per channel (the point of PKD), 0 for a copy
    a = torch.rand(1, 5, 1, 1, dtype=torch.float64) + 0.5
    moved = pkd_loss(student["p2"] * a - 3.0, teacher["p2"])
    torch.testing.assert_close(moved, pkd_loss(student["p2"], teacher["p2"]), rtol=1e-6, atol=0)
    assert pkd_loss(teacher["p2"] * 7 + 1, teacher["p2"]) < 1e-9
    # float32 input gives a float32 loss
    assert pkd_loss(student["p2"].float(), teacher["p2"].float()).dtype == torch.float32


# ---- CWD ---------------------------------------------------------------------------------


def _cwd_reference(s, t, tau):
    n, c = s.shape[:2]
    total = 0.0
    for i in range(n):
        for j in range(c):
            ps = torch.exp(s[i, j].flatten() / tau)
            pt = torch.exp(t[i, j].flatten() / tau)
            ps, pt = ps / ps.sum(), pt / pt.sum()
            total = total + (pt * torch.log(pt / ps)).sum()
    return tau**2 * total / (n * c)


def test_cwd_matches_float64_formula():
    shapes = {"p2": (2, 3, 8, 10), "p3": (2, 3, 4, 5), "p6": (2, 3, 1, 2)}
    student = _features(shapes, 2, scale=2.0)
    teacher = _features(shapes, 3, scale=3.0, shift=1.0)
    for tau in (1.0, 2.5):
        term = CWD(in_features=list(shapes), temperature=tau, loss_weight=10.0)
        losses = term(DistillInputs(None, student, teacher, []))
        want = 10.0 * sum(_cwd_reference(student[f], teacher[f], tau) for f in shapes)
        assert set(losses) == {"loss_cwd"}
        torch.testing.assert_close(losses["loss_cwd"], want, rtol=1e-10, atol=0)
    # 0 for the teacher itself; a uniform shift of a channel changes no softmax
    same = term(DistillInputs(None, {f: t + 4.0 for f, t in teacher.items()}, teacher, []))
    assert same["loss_cwd"].abs() < 1e-10


# ---- FGD ---------------------------------------------------------------------------------


def _masks_reference(boxes, stride, size):
    """Per pixel: in box r if its cell [j s, (j+1) s) x [i s, (i+1) s) overlaps the box with
    positive area; S = 1 / (pixels of r on the map), the largest over the boxes it is in."""
    h, w = size
    fg = torch.zeros(len(boxes), h, w, dtype=torch.float64)
    for n, image_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in image_boxes.tolist():
            cells = [
                (i, j)
                for i in range(h)
                for j in range(w)
                if j * stride < x2 and (j + 1) * stride > x1
                if i * stride < y2 and (i + 1) * stride > y1
            ]
            for i, j in cells:
                fg[n, i, j] = max(fg[n, i, j], 1.0 / len(cells))
    bg = (fg == 0).double()
    for n in range(len(boxes)):
        if bg[n].sum() > 0:
            bg[n] /= bg[n].sum()
    return fg, bg


FGD_BOXES = [
    # overlapping boxes (the small one wins where they overlap), one across the right and
    # bottom edges, one on exact cell boundaries
    torch.tensor(
        [[3.0, 5.0, 27.5, 21.0], [10.0, 9.0, 17.0, 14.0], [30.0, 20.0, 52.0, 47.0]],
        dtype=torch.float64,
    ),
    torch.tensor([[8.0, 8.0, 16.0, 24.0]], dtype=torch.float64),
    torch.zeros(0, 4, dtype=torch.float64),  # an image without objects
]


def test_fgd_masks_match_their_definition():
    for stride, size in ((4, (8, 10)), (8, (4, 5)), (16, (2, 3))):
        fg, bg = fgd_masks(FGD_BOXES, stride, size, torch.float64)
        want_fg, want_bg = _masks_reference(FGD_BOXES, stride, size)
        torch.testing.assert_close(fg, want_fg, rtol=0, atol=1e-15)
        torch.testing.assert_close(bg, want_bg, rtol=0, atol=1e-15)
        assert (fg[2] == 0).all() and math.isclose(bg[2].sum().item(), 1.0)
    fg, _ = fgd_masks(FGD_BOXES, 4, (8, 10))  # float32 by default
    assert math.isclose(fg[1].sum().item(), 1.0)  # one box: its scale mask sums to 1
    assert fg[1, 2, 2].item() == 1 / 8 and fg[1, 1, 2].item() == 0  # x 8..16, y 8..24 at stride 4


def _attention_reference(x, tau):
    n, c, h, w = x.shape
    a = x.abs()
    s = torch.exp(a.mean(dim=1) / tau)
    s = h * w * s / s.sum(dim=(1, 2), keepdim=True)
    ch = torch.exp(a.mean(dim=(2, 3)) / tau)
    ch = c * ch / ch.sum(dim=1, keepdim=True)
    return s, ch


def _gcblock_reference(gc, x):
    """R(F) = F + W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k F) F_j)), from the block's weights."""
    n, c = x.shape[:2]
    k = torch.einsum("c,nchw->nhw", gc.w_k.weight[0, :, 0, 0], x) + gc.w_k.bias[0]
    a = torch.exp(k) / torch.exp(k).sum(dim=(1, 2), keepdim=True)
    context = (x * a[:, None]).sum(dim=(2, 3))  # (N, C)
    v = context @ gc.w_v1.weight[:, :, 0, 0].T + gc.w_v1.bias
    mean = v.mean(dim=1, keepdim=True)
    var = ((v - mean) ** 2).mean(dim=1, keepdim=True)
    v = (v - mean) / torch.sqrt(var + gc.ln.eps) * gc.ln.weight[:, 0, 0] + gc.ln.bias[:, 0, 0]
    v = torch.clamp(v, min=0) @ gc.w_v2.weight[:, :, 0, 0].T + gc.w_v2.bias
    return x + v[:, :, None, None]


def test_fgd_matches_float64_formula():
    levels, strides = ["p2", "p3"], [4, 8]
    c_s, c_t, tau = 6, 4, 0.5
    weights = {"fg": 2e-1, "bg": 3e-1, "at": 5e-2, "global": 7e-2}
    term = FGD(
        in_features=levels,
        student_channels=[c_s, c_s],
        teacher_channels=[c_t, c_t],
        strides=strides,
        temperature=tau,
        alpha=weights["fg"],
        beta=weights["bg"],
        gamma=weights["at"],
        lambda_=weights["global"],
        loss_weight=1.5,
    ).double()
    assert all(b.align is not None for b in term.blocks.values())  # 6 -> 4 channels
    _randomise(term, 4)  # GcBlocks are not the identity, the LayerNorm has affine terms
    student = _features({"p2": (3, c_s, 8, 10), "p3": (3, c_s, 4, 5)}, 5)
    teacher = _features({"p2": (3, c_t, 8, 10), "p3": (3, c_t, 4, 5)}, 6, scale=2.0)
    gt = []
    for b in FGD_BOXES:
        inst = Instances((32, 40))
        inst.gt_boxes = Boxes(b)
        gt.append(inst)

    want = {k: 0.0 for k in weights}
    for f, stride in zip(levels, strides):
        block = term.blocks[f]
        s = F.conv2d(student[f], block.align.weight, block.align.bias)
        t = teacher[f]
        fg, bg = _masks_reference(FGD_BOXES, stride, t.shape[-2:])
        spatial_t, channel_t = _attention_reference(t, tau)
        spatial_s, channel_s = _attention_reference(s, tau)
        err = spatial_t[:, None] * channel_t[:, :, None, None] * (t - s) ** 2
        want["fg"] += weights["fg"] * (err * fg[:, None]).sum() / 3
        want["bg"] += weights["bg"] * (err * bg[:, None]).sum() / 3
        at = (spatial_t - spatial_s).abs().sum() + (channel_t - channel_s).abs().sum()
        want["at"] += weights["at"] * at / 3
        rel = _gcblock_reference(block.gc_teacher, t) - _gcblock_reference(block.gc_student, s)
        want["global"] += weights["global"] * (rel**2).sum() / 3

    with EventStorage(0) as storage:
        losses = term(DistillInputs(None, student, teacher, gt))
    assert set(losses) == {"loss_fgd"}
    torch.testing.assert_close(losses["loss_fgd"], 1.5 * sum(want.values()), rtol=1e-10, atol=0)
    logged = storage.latest()
    for k, v in want.items():
        assert v > 0
        assert math.isclose(logged[f"fgd/{k}"][0], v.item(), rel_tol=1e-6), k


# ---- MGD ---------------------------------------------------------------------------------


def _mgd_reference(term, student, teacher, seed):
    """sum (T - G(S * M))^2 / N per level, M drawn from the seeded global generator: one
    (N, 1, H, W) uniform draw per level, finest first; a pixel is masked where R < lambda.
    ``seed`` None: no mask."""
    if seed is not None:
        torch.manual_seed(seed)
    total = 0.0
    for f in term.in_features:
        s, t = student[f], teacher[f]
        if seed is not None:
            r = torch.rand((s.shape[0], 1, *s.shape[-2:]))
            s = s * (r >= term.lambda_).double()
        g = term.blocks[f].generation
        x = F.conv2d(s, g[0].weight, g[0].bias, padding=1)
        x = F.conv2d(torch.clamp(x, min=0), g[2].weight, g[2].bias, padding=1)
        total = total + ((t - x) ** 2).sum() / s.shape[0]
    return term.loss_weight * total


def test_mgd_matches_float64_formula_with_reproducible_masks():
    levels = ["p2", "p3"]
    term = MGD(
        in_features=levels, student_channels=[4, 4], teacher_channels=[4, 4], lambda_=0.45
    ).double()
    term.loss_weight = 0.3
    assert all(b.align is None for b in term.blocks.values())
    shapes = {"p2": (2, 4, 12, 16), "p3": (2, 4, 6, 8)}
    student, teacher = _features(shapes, 7), _features(shapes, 8, scale=2.0)
    inputs = DistillInputs(None, student, teacher, [])

    term.train()
    torch.manual_seed(11)
    got = term(inputs)["loss_mgd"]
    torch.testing.assert_close(got, _mgd_reference(term, student, teacher, 11), rtol=1e-10, atol=0)
    torch.manual_seed(11)
    assert torch.equal(term(inputs)["loss_mgd"], got)  # reproducible under the global seed
    torch.manual_seed(12)
    assert not torch.equal(term(inputs)["loss_mgd"], got)  # and random across seeds
    # no mask outside training: deterministic, the formula with M = 1
    term.eval()
    evaluated = term(inputs)["loss_mgd"]
    torch.testing.assert_close(evaluated, _mgd_reference(term, student, teacher, None))
    assert torch.equal(term(inputs)["loss_mgd"], evaluated)
    # lambda is the expected fraction of masked pixels; the mask is shared by the channels
    torch.manual_seed(0)
    mask = mgd_mask((8, 3, 64, 64), 0.45, "cpu")
    assert mask.shape == (8, 1, 64, 64)
    assert abs(1 - mask.mean().item() - 0.45) < 0.02
    assert mgd_mask((2, 3, 8, 8), 0.0, "cpu").eq(1).all()


# ---- in the model ------------------------------------------------------------------------

# The four terms at once on the R-18 pair's config (a term alone is the same code, and so is
# each of the COCO configs; they compose like DKD + ReviewKD): one model build and one forward
# for all the checks of the model tests.
ALL_FOUR = ["MODEL.DISTILL.TERMS", repr(list(TERMS))]


def _config(name):
    return os.path.join(COCO, f"{name}.yaml")


def _calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.fixture(scope="module")
def four(dkd_opts):
    torch.manual_seed(1)  # not the teacher's seed: the tiny teacher is a random R-18 too
    return build_model(make_cfg(_config("pkd_r101_r18"), *dkd_opts, *ALL_FOUR))


def test_gradients_reach_student_and_training_only_modules_never_teacher(four):
    model = four
    assert list(model.distill_terms) == [t.lower() for t in TERMS]
    ids = {id(p) for p in model.parameters()}
    for name, term in model.distill_terms.items():
        assert isinstance(term, TERMS[name.upper()])
        assert term.in_features == PAPER[name.upper()]["IN_FEATURES"]
        assert all(id(p) in ids for p in term.parameters())  # optimised with the student
    assert not list(model.distill_terms["pkd"].parameters())
    assert not list(model.distill_terms["cwd"].parameters())
    backbone, head = _calls(model.teacher.backbone), _calls(model.teacher.roi_heads.box_head)
    model.train()
    model.zero_grad(set_to_none=True)
    with EventStorage(0):
        losses = model(batch())
    keys = {f"loss_{t.lower()}" for t in TERMS}
    assert keys | {"loss_cls", "loss_rpn_cls"} <= set(losses) and "loss_dkd" not in losses
    assert (len(backbone), len(head)) == (1, 0)  # one teacher pass, no teacher box head
    fpn = model.backbone
    for name, term in model.distill_terms.items():
        model.zero_grad(set_to_none=True)
        loss = losses[f"loss_{name}"]
        assert torch.isfinite(loss) and loss > 0, name
        loss.backward(retain_graph=True)
        assert fpn.fpn_lateral2.weight.grad.abs().sum() > 0, name  # student FPN
        assert fpn.bottom_up.res3[0].conv1.weight.grad.abs().sum() > 0, name  # student backbone
        assert model.roi_heads.box_predictor.cls_score.weight.grad is None  # features only
        assert all(p.grad is None for p in model.teacher.parameters()), name
        others = [t for n, t in model.distill_terms.items() if n != name]
        assert all(p.grad is None for t in others for p in t.parameters()), name
        if name == "mgd":
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
        if name == "fgd":
            # W_v2 starts at zero (the GcBlocks start as the identity): only it has a gradient.
            # The context's (W_k's) reaches it through W_v2's input gradient W_v2^T g, zero in
            # exact arithmetic; a backend's fused or reordered float32 kernels may leave rounding
            # there (a few ulps, ~1e-7 relative, of the terms they summed). 1e-5 of W_v2's own
            # gradient admits that and nothing else: a W_k really in the graph would get a
            # gradient of W_v2's order.
            gc = term.blocks["p2"].gc_student
            v2 = gc.w_v2.weight.grad.abs().sum()
            assert v2 > 0 and gc.w_k.weight.grad.abs().sum() <= 1e-5 * v2
    # once W_v2 has moved, every FGD parameter gets a gradient
    fgd = model.distill_terms["fgd"]
    for block in fgd.blocks.values():
        _randomise(block.gc_student.w_v2, 1, scale=0.05)
        _randomise(block.gc_teacher.w_v2, 2, scale=0.05)
    model.zero_grad(set_to_none=True)
    with EventStorage(0):
        model(batch())["loss_fgd"].backward()
    assert all(p.grad.abs().sum() > 0 for p in fgd.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    model.zero_grad(set_to_none=True)


def test_channels_aligned_or_refused_by_level(dkd_opts):
    # a 32-channel student FPN against the 64-channel teacher of the tiny runs
    narrow = ["MODEL.FPN.OUT_CHANNELS", "32"]
    for name in ("PKD", "CWD"):
        levels = PAPER[name]["IN_FEATURES"]
        message = f"levels {levels!r} of MODEL.DISTILL.{name}.IN_FEATURES have [32"
        opts = ["MODEL.DISTILL.TERMS", f"['{name}']", *narrow]
        with pytest.raises(ValueError, match=re.escape(message)):
            build_model(make_cfg(_config("pkd_r101_r18"), *dkd_opts, *opts))
    opts = ["MODEL.DISTILL.TERMS", "['FGD', 'MGD']", *narrow]
    model = build_model(make_cfg(_config("pkd_r101_r18"), *dkd_opts, *opts))
    aligns = [t.blocks[f].align for t in model.distill_terms.values() for f in t.in_features]
    assert all((a.in_channels, a.out_channels) == (32, 64) for a in aligns)
    model.train()
    with EventStorage(0):
        losses = model(batch())
    sum(losses[k] for k in ("loss_fgd", "loss_mgd")).backward()
    assert all(torch.isfinite(losses[k]) for k in ("loss_fgd", "loss_mgd"))
    assert all(a.weight.grad.abs().sum() > 0 for a in aligns)


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.DISTILL.PKD.IN_FEATURES", "['p2', 'p7']"], r"PKD.IN_FEATURES .* no \['p7'\]"),
        (["MODEL.DISTILL.TERMS", "['CWD']", "MODEL.DISTILL.CWD.IN_FEATURES", "[]"], "at least one"),
        (["MODEL.DISTILL.TERMS", "['CWD']", "MODEL.DISTILL.CWD.TEMPERATURE", "0.0"], "CWD.TEMP"),
        (["MODEL.DISTILL.TERMS", "['FGD']", "MODEL.DISTILL.FGD.GAMMA", "-1.0"], "FGD.GAMMA"),
        (["MODEL.DISTILL.TERMS", "['FGD']", "MODEL.DISTILL.FGD.TEMPERATURE", "-0.5"], "FGD.TEMP"),
        (["MODEL.DISTILL.TERMS", "['MGD']", "MODEL.DISTILL.MGD.LAMBDA", "1.0"], "MGD.LAMBDA"),
        (["MODEL.DISTILL.TERMS", "['MGD']", "MODEL.DISTILL.MGD.LOSS_WEIGHT", "-1.0"], "MGD.LOSS_W"),
    ],
)
def test_clear_errors_name_the_key(dkd_opts, opts, match):
    with pytest.raises(ValueError, match=match):
        build_model(make_cfg(_config("pkd_r101_r18"), *dkd_opts, *opts))


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


def test_export_of_a_student_trained_with_each_loads_in_vanilla_detectron2(dkd_opts, tmp_path):
    # DKD and the four feature terms together, on the R-18 pair's DKD + FGD config
    cfg = make_cfg(
        _config("dkdfgd_r101_r18"),
        *dkd_opts,
        "MODEL.DISTILL.TERMS",
        repr(["DKD", *TERMS]),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "0.0",
    )
    torch.manual_seed(1)  # not the teacher's seed
    model = build_model(cfg)
    blocks = {k: v.clone() for k, v in model.distill_terms.state_dict().items()}
    trained = _train(model)
    assert list(trained.distill_terms) == ["dkd", *(t.lower() for t in TERMS)]
    moved = [
        k for k, v in trained.distill_terms.state_dict().items() if not torch.equal(v, blocks[k])
    ]
    assert {k.split(".")[0] for k in moved} == {"fgd", "mgd"}  # their blocks were trained
    DetectionCheckpointer(trained, save_dir=str(tmp_path)).save("model_final")
    ckpt = str(tmp_path / "model_final.pth")
    saved = torch.load(ckpt)["model"]
    for name in ("fgd", "mgd"):  # the training-only blocks are in the checkpoint, for --resume
        assert any(k.startswith(f"distill_terms.{name}.blocks.p5.") for k in saved)

    student = load_student(cfg, ckpt)
    assert len(student.distill_terms) == 0 and student.teacher is None
    paths = export_student(student_cfg(cfg), student, str(tmp_path / "export"))
    state = torch.load(paths["weights"])["model"]
    assert not any(k.startswith("distill_terms") or "gc_" in k or "generation" in k for k in state)
    vcfg = get_cfg()  # vanilla detectron2: no dkd-det keys
    vcfg.merge_from_file(paths["config"])
    vanilla = build_model(vcfg)
    assert type(vanilla) is GeneralizedRCNN
    incompatible = DetectionCheckpointer(vanilla)._load_model({"model": state})
    assert not (incompatible.missing_keys or incompatible.unexpected_keys)
    vanilla.eval()
    inputs = [{"image": x["image"]} for x in batch(seed=7)]
    with torch.no_grad():
        ours, theirs = trained(inputs), vanilla(inputs)
    for x, y in zip(ours, theirs):
        x, y = x["instances"], y["instances"]
        assert len(x) > 0
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        assert torch.equal(x.scores, y.scores) and torch.equal(x.pred_classes, y.pred_classes)


# ---- the configs -------------------------------------------------------------------------


def _term_of(name):
    """ "dkdfgd_r101_r18" -> "FGD"; "pkd_r50_mv2" -> "PKD"."""
    return name.split("_")[0].upper().replace("DKD", "", 1)


def test_every_config_has_the_papers_hyperparameters(dkd_opts):
    assert len(CONFIGS) == 24 and all(os.path.isfile(_config(c)) for c in CONFIGS)
    for name in CONFIGS:
        term = _term_of(name)
        cfg = make_cfg(_config(name), *dkd_opts)
        terms = ["DKD", term] if name.startswith("dkd") else [term]
        assert list(cfg.MODEL.DISTILL.TERMS) == terms, name
        node = cfg.MODEL.DISTILL[term]
        for key, value in PAPER[term].items():
            assert node[key] == value, (name, key)
        heads = "DistillROIHeads" if len(terms) == 2 else "StandardROIHeads"
        assert cfg.MODEL.ROI_HEADS.NAME == heads, name
        if name.startswith("dkd"):  # the DKD term of the pair's dkd_*.yaml, unchanged
            dkd = cfg.MODEL.DISTILL.DKD
            assert (dkd.ALPHA, dkd.BETA, dkd.TEMPERATURE, dkd.LOSS_WEIGHT) == (1.0, 0.25, 1.0, 1.0)


# A random-init R-50 student (FrozenBN with identity statistics, no ImageNet weights offline)
# has exploding activations: CWD's and FGD's first step then makes the boxes NaN. Clipped
# gradients keep its 2 iterations finite; a student from ImageNet weights needs none.
R50_STUDENT_CLIP = [
    "SOLVER.CLIP_GRADIENTS.ENABLED",
    "True",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
    "1.0",
]


# Every one of the 24 configs through tools/train_net.py (in this process, see train_net_here),
# the teacher replaced by the tiny random one; no evaluation (DATASETS.TEST empty): the final
# evaluation is tested elsewhere.
@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_configs_train_two_iterations(name, tmp_path, dkd_opts, dataset_opts):
    out = str(tmp_path / name)
    train_net_here(
        "--config-file",
        _config(name),
        *TINY,
        *dkd_opts,
        *dataset_opts,
        "OUTPUT_DIR",
        out,
        "SOLVER.MAX_ITER",
        "2",
        "DATASETS.TEST",
        "()",
        *R50_STUDENT_CLIP * name.endswith("_r101_r50"),
    )
    with open(os.path.join(out, "metrics.json")) as f:
        last = [r for r in map(json.loads, f) if "total_loss" in r][-1]
    term = _term_of(name).lower()
    assert last["iteration"] == 1 and math.isfinite(last[f"loss_{term}"])
    assert ("loss_dkd" in last) == name.startswith("dkd")
    state = torch.load(os.path.join(out, "model_final.pth"))["model"]
    assert any(k.startswith(f"distill_terms.{term}.blocks.p5.") for k in state) == (
        term in ("fgd", "mgd")
    )
