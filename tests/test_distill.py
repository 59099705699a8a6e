"""The registry of distillation terms: each term's loss is its formula on the model's own
inputs, terms compose, a config names them, old keys are refused with the new ones named, and
a term defined here, outside dkd_det, trains through tools/train_net.py without any edit to
the package."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from dkd_det.config import get_dkd_cfg
from dkd_det.distill import DISTILL_TERM_REGISTRY, DistillTerm
from dkd_det.losses import dkd_loss, kd_loss

from helpers import (
    DKD_R18,
    R18,
    ROOT,
    TEACHER_OPTS,
    TINY,
    batch,
    captured_logs,
    make_cfg,
    run_tool,
    save_random_model,
)

# ---- an out-of-tree term: this module is its plugin (DKD_DET_PLUGINS) ------------------------


@DISTILL_TERM_REGISTRY.register()
class ToyL2(DistillTerm):
    """Mean squared difference between one level of the student's and the teacher's FPN
    features: ``{"loss_toyl2": weight * mean((s - t)^2)}``, (N, C, H, W) each."""

    reads = frozenset({"student_features", "teacher_features"})

    @configurable
    def __init__(self, *, level: str = "p3", **kw):
        super().__init__(**kw)
        self.level = level

    @classmethod
    def add_term_config(cls, node):
        node.LEVEL = "p3"

    @classmethod
    def from_config(cls, cfg, student, teacher):
        return {**cls.shared_kwargs(cfg), "level": cls.term_config(cfg).LEVEL}

    def losses(self, inputs):
        s, t = inputs.student_features[self.level], inputs.teacher_features[self.level]
        return {"loss_toyl2": F.mse_loss(s, t)}


TOY_YAML = f"""_BASE_: "{os.path.join(ROOT, 'configs/COCO/dkd_r101_r18.yaml')}"
MODEL:
  DISTILL:
    TERMS: ["DKD", "TOYL2"]
    TOYL2:
      LOSS_WEIGHT: 0.5
      LEVEL: "p4"
"""


def _captured_inputs(term):
    """The DistillInputs the model hands ``term`` in its next training forward."""
    seen = []
    term.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    return seen


def test_a_term_from_outside_the_package_is_configured_and_trained(tmp_path, dkd_opts):
    config = tmp_path / "toy.yaml"
    config.write_text(TOY_YAML)
    cfg = get_dkd_cfg(str(config), TINY + dkd_opts)
    model = build_model(cfg)
    assert (
        list(model.distill_terms) == ["dkd", "toyl2"] and model.distill_terms["toyl2"].level == "p4"
    )
    seen = _captured_inputs(model.distill_terms["toyl2"])
    model.train()
    with EventStorage(0):
        losses = model(batch())
    (inputs,) = seen
    want = 0.5 * F.mse_loss(inputs.student_features["p4"], inputs.teacher_features["p4"])
    torch.testing.assert_close(losses["loss_toyl2"], want)
    assert "loss_dkd" in losses and inputs.teacher_logits is not None  # DKD reads them


@pytest.mark.slow
def test_out_of_tree_term_trains_through_train_net(tmp_path, dkd_opts, dataset_opts):
    config = tmp_path / "toy.yaml"
    config.write_text(TOY_YAML)
    out = tmp_path / "out"
    env = {
        "DKD_DET_PLUGINS": os.path.abspath(__file__),
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }
    opts = TINY + dkd_opts + dataset_opts + ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)]
    run = run_tool("train_net.py", "--config-file", str(config), *opts, env=env)
    assert run.returncode == 0, run.stdout[-3000:]
    with open(out / "metrics.json") as f:
        last = [r for r in map(json.loads, f) if "total_loss" in r][-1]
    assert last["iteration"] == 1 and {"loss_toyl2", "loss_dkd"} <= set(last)
    # Without the plugin the term is unknown, and the error says how to register it.
    bare = run_tool("train_net.py", "--config-file", str(config), *opts, env={"PYTHONPATH": ""})
    assert bare.returncode != 0 and "DKD_DET_PLUGINS" in bare.stdout


# ---- the logit terms are their formulas on the model's own logits ------------------------------


@pytest.mark.parametrize("term", ["DKD", "KD"])
def test_logit_term_is_its_formula_on_the_student_and_teacher_logits(term, dkd_opts):
    torch.manual_seed(0)
    model = build_model(make_cfg(DKD_R18, *dkd_opts, "MODEL.DISTILL.TERMS", repr([term])))
    seen = _captured_inputs(model.distill_terms[term.lower()])
    model.train()
    with EventStorage(0):
        losses = model(batch())
    (inputs,) = seen
    # The logits handed on are the student's and the teacher's box heads on the sampled boxes.
    heads, t_heads = model.roi_heads, model.teacher.roi_heads
    with torch.no_grad():
        images = model.preprocess_image(batch())
        feats = model.backbone(images.tensor)
        s_box = heads.box_pooler([feats[f] for f in heads.box_in_features], inputs.boxes)
        t_feats = model.teacher_features(batch())
        t_box = t_heads.box_pooler([t_feats[f] for f in t_heads.box_in_features], inputs.boxes)
        student = heads.box_predictor(heads.box_head(s_box))[0]
        teacher = t_heads.box_predictor(t_heads.box_head(t_box))[0]
    torch.testing.assert_close(inputs.student_logits, student)
    torch.testing.assert_close(inputs.teacher_logits, teacher)
    if term == "KD":
        want = kd_loss(student, teacher, temperature=1.0)
        assert set(losses) & {"loss_kd", "loss_dkd"} == {"loss_kd"}
    else:
        want = dkd_loss(student, teacher, inputs.gt_classes, alpha=1.0, beta=0.25, temperature=1.0)
        assert set(losses) & {"loss_kd", "loss_dkd"} == {"loss_dkd"}
    got = losses[f"loss_{term.lower()}"]
    torch.testing.assert_close(got, want)
    # ... and it teaches the student's classifier, never the teacher.
    got.backward()
    assert heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


REVIEWKD_ALONE = os.path.join(ROOT, "configs/COCO/reviewkd_r101_r18.yaml")


def test_feature_terms_alone_train_with_detectron2s_roi_heads(dkd_opts):
    model = build_model(make_cfg(REVIEWKD_ALONE, *dkd_opts))
    assert type(model.roi_heads).__name__ == "StandardROIHeads"
    teacher_head = []
    model.teacher.roi_heads.box_head.register_forward_hook(lambda *_: teacher_head.append(1))
    model.train()
    with EventStorage(0):
        losses = model(batch())
    assert "loss_reviewkd" in losses and teacher_head == []  # no term reads teacher logits
    # A logit term with those heads is refused, naming the key to set.
    with pytest.raises(ValueError, match="set MODEL.ROI_HEADS.NAME DistillROIHeads"):
        build_model(make_cfg(REVIEWKD_ALONE, *dkd_opts, "MODEL.DISTILL.TERMS", "['KD']"))


# ---- old keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml, opts, new",
    [
        ("MODEL:\n  DISTILL:\n    TYPE: KD\n", [], "MODEL.DISTILL.TERMS"),
        ("MODEL:\n  DISTILL:\n    FEATURE:\n      TYPE: REVIEWKD\n", [], "MODEL.DISTILL.TERMS"),
        ("", ["MODEL.DISTILL.ALPHA", "2.0"], "MODEL.DISTILL.DKD.ALPHA"),
        ("", ["MODEL.DISTILL.FEATURE.TYPE", "REVIEWKD"], "MODEL.DISTILL.TERMS"),
        ("", ["MODEL.DISTILL.FEATURE.REVIEWKD.NORM", "GN"], "MODEL.DISTILL.REVIEWKD.NORM"),
        ("", ["MODEL.DISTILL.WARMUP_ITERS", "5"], "MODEL.DISTILL.<TERM>.WARMUP_ITERS"),
    ],
)
def test_old_distillation_keys_name_the_new_ones(tmp_path, yaml, opts, new):
    config = tmp_path / "old.yaml"
    config.write_text(f'_BASE_: "{DKD_R18}"\n{yaml}')
    with pytest.raises(KeyError, match=f"renamed to {new}"):
        get_dkd_cfg(str(config), opts)


def test_every_shipped_config_lists_registered_terms():
    from dkd_det.distill import term_names

    for folder in ("COCO", "COCO-InstanceSegmentation", "Synthetic"):
        for name in sorted(os.listdir(os.path.join(ROOT, "configs", folder))):
            cfg = get_dkd_cfg(os.path.join(ROOT, "configs", folder, name))
            term_names(cfg)  # raises on an unknown term


# ---------------------------------------------------------------------------------------------
# Heads DKD cannot distil


@pytest.mark.parametrize("key", ["USE_SIGMOID_CE", "USE_FED_LOSS"])
def test_sigmoid_or_federated_box_predictor_is_refused(key, dkd_opts):
    # Both refused before any model is built (detectron2 would assert on some combinations).
    with pytest.raises(ValueError, match=f"MODEL.ROI_BOX_HEAD.{key} is True for the student"):
        build_model(make_cfg(DKD_R18, *dkd_opts, f"MODEL.ROI_BOX_HEAD.{key}", "True"))
    cfg = make_cfg(
        DKD_R18, *dkd_opts, "MODEL.TEACHER.OPTS", repr(TINY + [f"MODEL.ROI_BOX_HEAD.{key}", "True"])
    )
    with pytest.raises(ValueError, match=f"MODEL.ROI_BOX_HEAD.{key} is True for the teacher"):
        build_model(cfg)
    # A plain student (no distillation), or one with feature terms only, may use them.
    build_model(
        make_cfg(DKD_R18, "MODEL.DISTILL.TERMS", "[]", "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True")
    )


def test_single_class_warns_that_nckd_vanishes(tmp_path):
    one = ["MODEL.ROI_HEADS.NUM_CLASSES", "1"]
    teacher = save_random_model(make_cfg(R18, *one), str(tmp_path / "one_class.pth"))
    opts = TEACHER_OPTS[:-1] + [repr(TINY + one), "MODEL.TEACHER.WEIGHTS", teacher]
    records, remove = captured_logs("dkd_det.distill.dkd")
    try:
        build_model(make_cfg(DKD_R18, *opts, *one))
        assert any("NCKD is identically 0" in r and "ALPHA" in r for r in records), records
        records.clear()
        build_model(make_cfg(DKD_R18, *opts, *one, "MODEL.DISTILL.TERMS", "['KD']"))
        assert records == []
    finally:
        remove()
    # It is so: one class, any logits -> NCKD 0.
    from dkd_det.losses import decoupled_kd

    g = torch.Generator().manual_seed(0)
    _, nckd = decoupled_kd(
        torch.randn(16, 2, generator=g),
        torch.randn(16, 2, generator=g),
        torch.randint(0, 2, (16,), generator=g),
        2.0,
    )
    assert nckd.abs().item() < 1e-6


# ---------------------------------------------------------------------------------------------
# TCKD/NCKD: the mean over ranks; the image check split over ranks


def _rank_logits(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return (
        torch.randn(32, 4, generator=g) * 3,
        torch.randn(32, 4, generator=g) * 3,
        torch.randint(0, 4, (32,), generator=g),
    )


def _two_rank_worker(out_dir, paths, args=None):
    """One rank's work; ``args``: train_net.py's arguments, which dkd-det's launch passes."""
    from detectron2.utils import comm

    from dkd_det.data import find_broken_images
    from dkd_det.distill import DKD, DistillInputs

    term = DKD(temperature=2.0, alpha=1.0, beta=8.0)
    z_s, z_t, t = _rank_logits(comm.get_rank())
    with EventStorage(0) as storage:
        term(DistillInputs(None, {}, {}, [], gt_classes=t, student_logits=z_s, teacher_logits=z_t))
        logged = {k: storage.latest()[k][0] for k in ("dkd/tckd", "dkd/nckd")}
    broken = find_broken_images(paths)  # its all_gather is the last collective
    torch.save({"logged": logged, "broken": broken}, os.path.join(out_dir, f"{comm.get_rank()}.pt"))


@pytest.mark.slow
def test_tckd_nckd_are_the_mean_over_ranks(tmp_path, tiny_data):
    """Two GLOO processes: both log the mean of the ranks' TCKD and NCKD (as detectron2 logs
    the losses), and the image check, split between them, gives both the whole answer.
    Through dkd-det's launch, as tools/train_net.py: it settles the collectives as the ranks
    end (without that, 1 run in 10 of this worker aborted at exit)."""
    import functools

    from dkd_det.engine import argument_parser, launch
    from dkd_det.losses import decoupled_kd

    root = tiny_data["val"][1]
    paths = [os.path.join(root, n) for n in sorted(os.listdir(root))]
    paths += [str(tmp_path / "gone.png"), str(tmp_path / "empty.png")]
    open(tmp_path / "empty.png", "w").close()
    args = argument_parser().parse_args(["--num-gpus", "2", "--dist-url", "auto"])
    launch(functools.partial(_two_rank_worker, str(tmp_path), paths), args)
    local = [decoupled_kd(*_rank_logits(r), 2.0) for r in (0, 1)]
    for rank in (0, 1):
        out = torch.load(tmp_path / f"{rank}.pt")
        for i, name in enumerate(("dkd/tckd", "dkd/nckd")):
            mean = (local[0][i].item() + local[1][i].item()) / 2
            assert out["logged"][name] == pytest.approx(mean, rel=1e-5), (rank, name)
        assert list(out["broken"]) == paths[-2:]
    assert local[0][0].item() != pytest.approx(local[1][0].item())  # the ranks did differ
