"""Cascade R-CNN and LazyConfig teachers, Cascade students: the teacher's logits are its heads
on exactly the student's boxes (the stages' mean probability, or one stage), a Cascade student
is distilled stage by stage, a teacher of other classes is refused before anything is built,
and tools/train_net.py trains and evaluates each pairing."""

import json

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from detectron2.structures import pairwise_iou
from detectron2.utils.events import EventStorage

from dkd_det.config import student_cfg
from dkd_det.export import export_student
from dkd_det.losses import dkd_loss

from helpers import (
    CASCADE,
    CASCADE_TEACHER_OPTS,
    DKD_CASCADE_R18,
    DKD_R18,
    NUM_CLASSES,
    R18,
    TEACHER_OPTS,
    TINY,
    batch,
    make_cfg,
    save_lazy_teacher,
    save_random_model,
    train_net_here,
)


@pytest.fixture(scope="module")
def cascade_teacher(tmp_path_factory):
    """A random-init Cascade R-CNN R-18 teacher in detectron2's .pth format, and its opts."""
    path = str(tmp_path_factory.mktemp("cascade_teacher") / "cascade.pth")
    save_random_model(make_cfg(R18, *CASCADE), path)
    return CASCADE_TEACHER_OPTS + ["MODEL.TEACHER.WEIGHTS", path]


@pytest.fixture(scope="module")
def faster_teacher(teacher_weights):
    return TEACHER_OPTS + ["MODEL.TEACHER.WEIGHTS", teacher_weights]


def _term_inputs(term):
    """The DistillInputs of every call of ``term`` in the next training forward."""
    seen = []
    term.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    return seen


def _head_logits(heads, features, boxes, k):
    """Stage k's (or the one head's) logits on ``boxes``, from the modules themselves."""
    pooled = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
    if isinstance(heads, CascadeROIHeads):
        return heads.box_predictor[k](heads.box_head[k](pooled))[0]
    return heads.box_predictor(heads.box_head(pooled))[0]


@pytest.mark.parametrize("scores", ["mean", "stage1"])
def test_cascade_teacher_scores_a_faster_students_boxes(scores, cascade_teacher):
    torch.manual_seed(0)
    cfg = make_cfg(DKD_R18, *cascade_teacher, "MODEL.TEACHER.CASCADE_SCORES", scores)
    model = build_model(cfg)
    assert type(model.teacher.roi_heads) is CascadeROIHeads
    seen = _term_inputs(model.distill_terms["dkd"])
    model.train()
    with EventStorage(0):
        losses = model(batch())
    (inputs,) = seen
    with torch.no_grad():
        t_feats = model.teacher_features(batch())
        stages = [_head_logits(model.teacher.roi_heads, t_feats, inputs.boxes, k) for k in range(3)]
    if scores == "mean":
        # detectron2's inference score: the mean of the stages' softmax; its log as the logits.
        want_probs = torch.stack([F.softmax(z, dim=1) for z in stages]).mean(0)
        torch.testing.assert_close(F.softmax(inputs.teacher_logits, dim=1), want_probs)
        teacher = want_probs.log()
    else:
        teacher = stages[1]
        torch.testing.assert_close(inputs.teacher_logits, teacher)
    want = dkd_loss(inputs.student_logits, teacher, inputs.gt_classes, alpha=1.0, beta=0.25)
    torch.testing.assert_close(losses["loss_dkd"], want)


def test_cascade_scores_names_a_stage_the_teacher_has(cascade_teacher, faster_teacher):
    with pytest.raises(ValueError, match="has 3 box stage.*'stage0', 'stage1', 'stage2'"):
        build_model(make_cfg(DKD_R18, *cascade_teacher, "MODEL.TEACHER.CASCADE_SCORES", "stage3"))
    with pytest.raises(ValueError, match="CASCADE_SCORES = 'last'.*'mean'"):
        build_model(make_cfg(DKD_R18, *cascade_teacher, "MODEL.TEACHER.CASCADE_SCORES", "last"))
    # A Faster R-CNN teacher is one stage: stage0 is its head.
    build_model(make_cfg(DKD_R18, *faster_teacher, "MODEL.TEACHER.CASCADE_SCORES", "stage0"))


def _labels(boxes, gt, iou, num_classes):
    """detectron2's labelling, recomputed: the class of the best-overlapping ground truth where
    that IoU reaches the stage's threshold, else background."""
    out = []
    for b, g in zip(boxes, gt):
        best, idx = pairwise_iou(g.gt_boxes, b).max(dim=0)
        cls = g.gt_classes[idx].clone()
        cls[best < iou] = num_classes
        out.append(cls)
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["faster", "cascade"])
def test_cascade_student_is_distilled_stage_by_stage(kind, faster_teacher, cascade_teacher):
    """At stage k the loss is DKD between the student's stage-k logits and the teacher's logits
    for exactly the stage-k boxes: its stage-k head (Cascade) or its one head (Faster R-CNN)."""
    torch.manual_seed(0)
    opts = cascade_teacher if kind == "cascade" else faster_teacher
    # CASCADE_SCORES is for one-head students: a Cascade student pairs the stages regardless.
    model = build_model(make_cfg(DKD_CASCADE_R18, *opts, "MODEL.TEACHER.CASCADE_SCORES", "stage0"))
    heads = model.roi_heads
    assert type(heads).__name__ == "DistillCascadeROIHeads" and heads.num_cascade_stages == 3
    # What the student's box head saw, observed on its own modules: the boxes pooled and each
    # stage's logits.
    pooled, logits = [], []
    heads.box_pooler.register_forward_pre_hook(lambda m, args: pooled.append(args[1]))
    for predictor in heads.box_predictor:
        predictor.register_forward_hook(lambda m, args, out: logits.append(out[0]))
    model.train()
    data = batch()
    with EventStorage(0) as storage:
        losses = model(data)
    assert len(pooled) == len(logits) == 3
    assert {f"loss_dkd_stage{k}" for k in range(3)} | {"loss_cls_stage2"} <= set(losses)
    assert "loss_dkd" not in losses
    assert {f"stage{k}/dkd/tckd" for k in range(3)} <= set(storage.histories())
    gt = [x["instances"] for x in data]
    ious = model.roi_heads.proposal_matchers
    with torch.no_grad():
        t_feats = model.teacher_features(data)
        for k in range(3):
            boxes = pooled[k]
            if k > 0:  # stage k's boxes are stage k-1's regressions, not the sampled proposals
                assert not torch.equal(boxes[0].tensor, pooled[0][0].tensor)
            teacher = _head_logits(model.teacher.roi_heads, t_feats, boxes, k)
            labels = _labels(boxes, gt, ious[k].thresholds[1], NUM_CLASSES)
            want = dkd_loss(logits[k], teacher, labels, alpha=1.0, beta=0.25)
            torch.testing.assert_close(losses[f"loss_dkd_stage{k}"], want)
    # Stage 2's distillation teaches stage 2's classifier, not stage 0's, never the teacher.
    losses["loss_dkd_stage2"].backward()
    assert heads.box_predictor[2].cls_score.weight.grad.abs().sum() > 0
    assert heads.box_predictor[0].cls_score.weight.grad is None
    assert all(p.grad is None for p in model.teacher.parameters())


def test_cascade_student_exports_to_vanilla_detectron2(faster_teacher, tmp_path):
    cfg = make_cfg(DKD_CASCADE_R18, *faster_teacher)
    model = build_model(cfg)
    paths = export_student(student_cfg(cfg), model, str(tmp_path / "export"))
    vcfg = get_cfg()  # vanilla detectron2: no dkd-det keys
    vcfg.merge_from_file(paths["config"])
    vanilla = build_model(vcfg)  # detectron2's GeneralizedRCNN, CascadeROIHeads
    assert type(vanilla.roi_heads) is CascadeROIHeads
    vanilla.load_state_dict(torch.load(paths["weights"])["model"])  # strict: the same keys
    model.eval(), vanilla.eval()
    inputs = [{"image": x["image"]} for x in batch(seed=3)]
    with torch.no_grad():
        for a, b in zip(model(inputs), vanilla(inputs)):
            a, b = a["instances"], b["instances"]
            assert len(a) > 0 and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
            assert torch.equal(a.scores, b.scores)


def test_cascade_stage_counts_must_match(tmp_path, faster_teacher):
    two = CASCADE + [
        "MODEL.ROI_BOX_CASCADE_HEAD.IOUS",
        "(0.5, 0.6)",
        "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS",
        "((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0))",
    ]
    weights = save_random_model(make_cfg(R18, *two), str(tmp_path / "two.pth"))
    opts = ["MODEL.TEACHER.OPTS", repr(TINY + two), "MODEL.TEACHER.WEIGHTS", weights]
    with pytest.raises(ValueError, match="student has 3 stages and the Cascade teacher 2"):
        build_model(make_cfg(DKD_CASCADE_R18, *CASCADE_TEACHER_OPTS[:2], *opts))
    # The logit terms need a head that keeps the logits: named for a plain CascadeROIHeads.
    with pytest.raises(ValueError, match="set MODEL.ROI_HEADS.NAME DistillCascadeROIHeads"):
        build_model(
            make_cfg(DKD_CASCADE_R18, *faster_teacher, "MODEL.ROI_HEADS.NAME", "CascadeROIHeads")
        )


# ---- LazyConfig teachers ------------------------------------------------------------------------


def test_lazy_teacher_is_built_loaded_and_normalises_its_own_way(tmp_path, monkeypatch):
    config, weights = save_lazy_teacher(tmp_path)
    monkeypatch.setenv("DKD_DET_TRUST_FILES", "1")
    opts = ["MODEL.TEACHER.CONFIG_FILE", config, "MODEL.TEACHER.WEIGHTS", weights]
    model = build_model(make_cfg(DKD_R18, *opts))
    assert type(model.teacher.roi_heads) is StandardROIHeads
    assert (model.input_format, model.teacher.input_format) == ("RGB", "BGR")
    saved = torch.load(weights)["model"]
    assert all(torch.equal(saved[k], v) for k, v in model.teacher.state_dict().items())
    rgb = batch(1)[0]["image"]
    got = model.teacher_features([{"image": rgb}])
    mean = torch.tensor([103.530, 116.280, 123.675]).view(3, 1, 1)
    std = torch.tensor([57.375, 57.120, 58.395]).view(3, 1, 1)
    want = model.teacher.backbone(((rgb.flip(0) - mean) / std)[None])
    assert all(torch.allclose(got[k], want[k]) for k in want)
    model.train()
    with EventStorage(0):
        assert torch.isfinite(model(batch())["loss_dkd"])
    # Its overrides are LazyConfig's "key=value"; yacs pairs are refused, naming the syntax.
    with pytest.raises(ValueError, match="not a LazyConfig override.*'key=value'"):
        build_model(make_cfg(DKD_R18, *opts, "MODEL.TEACHER.OPTS", "['MODEL.DEVICE', 'cpu']"))
    with pytest.raises(ValueError, match="input_format None.*model.input_format='BGR'"):
        build_model(make_cfg(DKD_R18, *opts, "MODEL.TEACHER.OPTS", "['model.input_format=null']"))


# ---- the class count, refused before the student is built --------------------------------------


@pytest.mark.parametrize("kind", ["yaml", "cascade", "lazy", "model_zoo_lazy"])
def test_teacher_of_other_classes_is_refused_before_the_student_is_built(
    kind, tmp_path, monkeypatch, teacher_weights
):
    five = ["MODEL.ROI_HEADS.NUM_CLASSES", "5"]
    if kind == "yaml":
        opts = ["MODEL.TEACHER.CONFIG_FILE", R18, "MODEL.TEACHER.OPTS", repr(TINY + five)]
    elif kind == "cascade":
        opts = ["MODEL.TEACHER.CONFIG_FILE", R18, "MODEL.TEACHER.OPTS", repr(TINY + CASCADE + five)]
    elif kind == "lazy":
        config, _ = save_lazy_teacher(tmp_path)
        monkeypatch.setenv("DKD_DET_TRUST_FILES", "1")
        opts = ["MODEL.TEACHER.CONFIG_FILE", config]
        opts += ["MODEL.TEACHER.OPTS", "['model.roi_heads.num_classes=5']"]
    else:  # detectron2's own .py, 80 classes: installed code, loaded without DKD_DET_TRUST_FILES
        monkeypatch.delenv("DKD_DET_TRUST_FILES", raising=False)
        opts = ["MODEL.TEACHER.CONFIG_FILE", "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"]
        opts += ["MODEL.TEACHER.OPTS", "[]"]
    classes = 80 if kind == "model_zoo_lazy" else 5
    # A student that cannot be built: the teacher's classes are refused first.
    cfg = make_cfg(
        DKD_R18,
        *opts,
        "MODEL.TEACHER.WEIGHTS",
        teacher_weights,
        "MODEL.BACKBONE.NAME",
        "no_such_backbone",
    )
    with pytest.raises(
        ValueError, match=f"teacher predicts {classes} classes .*but the student {NUM_CLASSES} "
    ):
        build_model(cfg)


# ---- tools/train_net.py: each pairing trains 2 iterations and is evaluated -----------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "student, teacher, extra, keys",
    [
        (DKD_R18, "cascade", ["MODEL.TEACHER.CASCADE_SCORES", "mean"], {"loss_dkd"}),
        (DKD_R18, "cascade", ["MODEL.TEACHER.CASCADE_SCORES", "stage2"], {"loss_dkd"}),
        (DKD_CASCADE_R18, "faster", [], {f"loss_dkd_stage{k}" for k in range(3)}),
        (DKD_CASCADE_R18, "cascade", [], {f"loss_dkd_stage{k}" for k in range(3)}),
        (DKD_R18, "lazy", [], {"loss_dkd"}),
    ],
    ids=[
        "faster<-cascade-mean",
        "faster<-cascade-stage2",
        "cascade<-faster",
        "cascade<-cascade",
        "faster<-lazy",
    ],
)
def test_train_net_trains_and_evaluates(
    student,
    teacher,
    extra,
    keys,
    tmp_path,
    faster_teacher,
    cascade_teacher,
    dataset_opts,
    capsys,
    monkeypatch,
):
    if teacher == "lazy":
        config, weights = save_lazy_teacher(tmp_path)
        opts = ["MODEL.TEACHER.CONFIG_FILE", config, "MODEL.TEACHER.WEIGHTS", weights]
        monkeypatch.setenv("DKD_DET_TRUST_FILES", "1")
    else:
        opts = cascade_teacher if teacher == "cascade" else faster_teacher
    out = tmp_path / "out"
    train_net_here(
        "--config-file",
        student,
        *TINY,
        *opts,
        *extra,
        *dataset_opts,
        "SOLVER.MAX_ITER",
        "2",
        "OUTPUT_DIR",
        str(out),
    )
    stdout = capsys.readouterr().out  # detectron2's log
    with open(out / "metrics.json") as f:
        last = [r for r in map(json.loads, f) if "total_loss" in r][-1]
    assert last["iteration"] == 1 and keys <= set(last), sorted(last)
    assert "Evaluation results for bbox" in stdout
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in stdout
    if teacher == "lazy":
        assert "DKD_DET_TRUST_FILES=1: MODEL.TEACHER.CONFIG_FILE" in stdout
