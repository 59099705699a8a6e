"""Building the frozen teacher: its own config, its own weights, checked before training.

The teacher's config is a detectron2 yaml (a yacs ``CfgNode``, built with ``build_model``) or a
LazyConfig ``.py`` (an omegaconf config whose ``model`` is instantiated); see
:func:`get_teacher_cfg`. Its box classifier scores the student's boxes through
:func:`teacher_box_logits`, one small function per kind of ROI heads.
"""

import contextlib
import logging
import math
import os
import re
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, instantiate
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_model
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNOutputLayers, StandardROIHeads
from detectron2.structures import Boxes
from detectron2.utils.registry import locate

from ..checkpoint import StrictCheckpointer, load_lazy_config, resolve_weights
from ..config import get_dkd_cfg
from ..distill import box_predictors
from ..files import model_zoo_config_file

__all__ = [
    "build_teacher",
    "check_logit_teacher",
    "check_teacher_cfg",
    "get_teacher_cfg",
    "is_lazy_cfg",
    "parse_cascade_scores",
    "teacher_autocast",
    "teacher_box_logits",
    "TEACHER_DTYPES",
]

TEACHER_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}

logger = logging.getLogger(__name__)


def is_lazy_cfg(tcfg) -> bool:
    """Whether the teacher's config is a LazyConfig (from a ``.py``), not a yacs ``CfgNode``."""
    return not isinstance(tcfg, CfgNode)


def _who(cfg) -> str:
    return (
        f"the teacher (MODEL.TEACHER.CONFIG_FILE {cfg.MODEL.TEACHER.CONFIG_FILE!r} with "
        "MODEL.TEACHER.OPTS)"
    )


def get_teacher_cfg(cfg):
    """The teacher's own config, from ``MODEL.TEACHER.CONFIG_FILE``.

    The file may be a model-zoo name (``COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml``,
    ``new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py``) or a path.

    - yaml: a frozen detectron2 ``CfgNode`` with ``MODEL.TEACHER.OPTS`` (KEY VALUE pairs)
      merged on top, the student's device and ``MODEL.WEIGHTS = MODEL.TEACHER.WEIGHTS``.
    - ``.py``: the LazyConfig (``model`` is what is built) with ``MODEL.TEACHER.OPTS`` applied
      as ``"key=value"`` overrides (``LazyConfig.apply_overrides``). A ``.py`` file is code:
      only detectron2's packaged model-zoo ones load unless ``DKD_DET_TRUST_FILES=1``
      (:func:`dkd_det.checkpoint.load_lazy_config`).
    """
    path = cfg.MODEL.TEACHER.CONFIG_FILE
    key = "MODEL.TEACHER.CONFIG_FILE"
    if not path:
        raise ValueError(
            f"MODEL.DISTILL.TERMS is {list(cfg.MODEL.DISTILL.TERMS)} but "
            "MODEL.TEACHER.CONFIG_FILE is empty. Set it to the teacher's detectron2 config (a "
            "path, or a model-zoo name such as COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml), "
            "or MODEL.DISTILL.TERMS to [] for the plain student."
        )
    if not os.path.isfile(path):
        try:
            path = model_zoo_config_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"MODEL.TEACHER.CONFIG_FILE = {path!r} is neither a file nor a detectron2 "
                "model-zoo config name (such as COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml)."
            ) from None
    if path.endswith(".py"):
        opts = list(cfg.MODEL.TEACHER.OPTS)
        bad = [o for o in opts if not (isinstance(o, str) and "=" in o)]
        if bad:
            raise ValueError(
                f"MODEL.TEACHER.OPTS = {opts}: {bad[0]!r} is not a LazyConfig override. "
                f"{key} {cfg.MODEL.TEACHER.CONFIG_FILE!r} is a LazyConfig .py, whose overrides "
                "are 'key=value' strings (LazyConfig.apply_overrides), e.g. "
                "['model.roi_heads.num_classes=20'], not KEY VALUE pairs."
            )
        try:
            return load_lazy_config(path, key, opts)
        except KeyError as e:  # an override of a key the config does not have
            raise KeyError(f"MODEL.TEACHER.OPTS of {key} {path!r}: {e}") from None
    # dkd-det's keys too, so that a config written for dkd-det also reads as a teacher
    tcfg = get_dkd_cfg(path, cfg.MODEL.TEACHER.OPTS, key=key)
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = cfg.MODEL.TEACHER.WEIGHTS
    tcfg.freeze()
    return tcfg


def _lazy_select(tcfg, dotted: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(tcfg, dotted, default=None)


def check_teacher_cfg(cfg, tcfg) -> None:
    """What can be refused from the teacher's config alone, before any model (student or
    teacher) is built: a meta-architecture that is not a ``GeneralizedRCNN``, and a class count
    that differs from the student's ``MODEL.ROI_HEADS.NUM_CLASSES`` (both counts named).
    :func:`build_teacher` checks the built model again."""
    lazy = is_lazy_cfg(tcfg)
    if lazy:
        target = _lazy_select(tcfg, "model._target_")
        if isinstance(target, str):
            target = locate(target)
        meta, classes = target, _lazy_select(tcfg, "model.roi_heads.num_classes")
        name = getattr(meta, "__name__", str(meta))
        where = "model.roi_heads.num_classes"
    else:
        name = tcfg.MODEL.META_ARCHITECTURE
        meta = META_ARCH_REGISTRY.get(name) if name in META_ARCH_REGISTRY else None
        classes, where = tcfg.MODEL.ROI_HEADS.NUM_CLASSES, "its MODEL.ROI_HEADS.NUM_CLASSES"
    if isinstance(meta, type) and not issubclass(meta, GeneralizedRCNN):
        raise TypeError(
            f"The teacher ({_who(cfg)}) is a {name}, not a two-stage R-CNN: "
            "dkd-det distils a GeneralizedRCNN teacher (Faster/Mask/Cascade R-CNN)."
        )
    if isinstance(classes, int) and classes != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(_classes_error(cfg, classes, where))


def _classes_error(cfg, classes: int, where: str) -> str:
    return (
        f"The teacher predicts {classes} classes ({where}) but the student "
        f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES} (MODEL.ROI_HEADS.NUM_CLASSES): their logits "
        f"cannot be compared ({_who(cfg)}). Use a teacher trained on the student's classes, or "
        "set MODEL.ROI_HEADS.NUM_CLASSES to match."
    )


_STAGE = re.compile(r"stage(\d+)")


def parse_cascade_scores(value: str) -> Optional[int]:
    """``MODEL.TEACHER.CASCADE_SCORES`` as the stage it names: None for ``"mean"`` (all stages'
    probabilities averaged), ``k`` for ``"stage<k>"``; anything else is a ValueError."""
    if value == "mean":
        return None
    match = _STAGE.fullmatch(str(value))
    if match is None:
        raise ValueError(
            f"MODEL.TEACHER.CASCADE_SCORES = {value!r}: use 'mean' (the stages' softmax "
            "probabilities averaged, as detectron2's CascadeROIHeads scores at inference) or "
            "'stage0', 'stage1', ... (one stage's logits)."
        )
    return int(match.group(1))


def _build(cfg, tcfg) -> torch.nn.Module:
    if not is_lazy_cfg(tcfg):
        return build_model(tcfg)
    model = instantiate(tcfg.model)
    return model.to(torch.device(cfg.MODEL.DEVICE))


def build_teacher(cfg, tcfg=None) -> GeneralizedRCNN:
    """Build, load, check and freeze the teacher described by ``cfg.MODEL.TEACHER``.

    Raises a clear error if the config or weights are missing, if the weights do not fit
    the architecture (loaded strictly), if the teacher is not a ``GeneralizedRCNN``, if its
    class count differs from the student's ``MODEL.ROI_HEADS.NUM_CLASSES`` (checked on the
    config before anything is built, and on every built box predictor), if a LazyConfig
    teacher's ``input_format`` is neither RGB nor BGR, or if ``MODEL.TEACHER.CASCADE_SCORES``
    names a stage the teacher does not have. (What a distillation term needs of the teacher
    beyond that, the term checks.)

    Args:
        tcfg: the teacher's config if already built (:func:`get_teacher_cfg`).

    Returns:
        the teacher in eval mode with ``requires_grad=False`` on every parameter, on the
        student's device; ``teacher.cascade_stage`` is the parsed ``CASCADE_SCORES``.
    """
    tcfg = tcfg if tcfg is not None else get_teacher_cfg(cfg)
    check_teacher_cfg(cfg, tcfg)
    if not cfg.MODEL.TEACHER.WEIGHTS:
        raise ValueError(
            "MODEL.TEACHER.WEIGHTS is empty: a randomly initialised teacher teaches nothing. "
            "Set it to the teacher's trained checkpoint (a path or a detectron2:// URL)."
        )
    cascade_stage = parse_cascade_scores(cfg.MODEL.TEACHER.CASCADE_SCORES)
    weights = resolve_weights(
        cfg.MODEL.TEACHER.WEIGHTS, "MODEL.TEACHER.WEIGHTS", cfg.MODEL.TEACHER.get("SHA256", "")
    )
    who = _who(cfg)
    teacher = _build(cfg, tcfg)
    if not isinstance(teacher, GeneralizedRCNN):
        raise TypeError(
            f"The teacher ({who}) is a {type(teacher).__name__}, not a two-stage R-CNN: "
            "dkd-det distils a GeneralizedRCNN teacher (Faster/Mask/Cascade R-CNN)."
        )
    heads = getattr(teacher, "roi_heads", None)
    if heads is not None and heads.num_classes != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(_classes_error(cfg, heads.num_classes, "its ROI heads"))
    for k, predictor in enumerate(box_predictors(heads)):
        out = getattr(getattr(predictor, "cls_score", None), "out_features", None)
        if out is not None and out != cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1:
            raise ValueError(_classes_error(cfg, out - 1, f"box predictor {k}'s cls_score"))
    stages = len(box_predictors(heads))
    if cascade_stage is not None and stages and cascade_stage >= stages:
        raise ValueError(
            f"MODEL.TEACHER.CASCADE_SCORES = {cfg.MODEL.TEACHER.CASCADE_SCORES!r}, but the "
            f"teacher ({who}, {type(heads).__name__}) has {stages} box stage(s): use 'mean' or "
            f"one of {[f'stage{k}' for k in range(stages)]}."
        )
    if is_lazy_cfg(tcfg) and teacher.input_format not in ("RGB", "BGR"):
        raise ValueError(
            f"The LazyConfig teacher ({who}) has input_format {teacher.input_format!r}: it must "
            "say which channel order its pixel_mean/pixel_std and weights expect, RGB or BGR "
            "(the student's images are flipped to it). Set it in the file or with "
            "MODEL.TEACHER.OPTS, e.g. [\"model.input_format='BGR'\"]."
        )
    StrictCheckpointer(
        teacher,
        key="MODEL.TEACHER.WEIGHTS",
        hint="Check that MODEL.TEACHER.WEIGHTS was trained with MODEL.TEACHER.CONFIG_FILE "
        "(and MODEL.TEACHER.OPTS, e.g. the class count).",
    ).load(weights)
    logger.info("Teacher %s loaded from %s", type(teacher).__name__, weights)
    teacher.eval()
    teacher.requires_grad_(False)
    teacher.cascade_stage = cascade_stage
    t = cfg.MODEL.TEACHER
    if t.DTYPE not in TEACHER_DTYPES:
        raise ValueError(f"MODEL.TEACHER.DTYPE = {t.DTYPE!r}: one of {sorted(TEACHER_DTYPES)}.")
    teacher.autocast_dtype = TEACHER_DTYPES[t.DTYPE]
    teacher.channels_last = bool(t.CHANNELS_LAST)
    if teacher.channels_last:
        teacher.to(memory_format=torch.channels_last)
    if t.COMPILE:
        teacher.backbone = torch.compile(teacher.backbone, backend=t.COMPILE, dynamic=True)
        logger.info("Teacher backbone compiled with torch.compile(backend=%r)", t.COMPILE)
    return teacher


def teacher_autocast(teacher, device: torch.device):
    """The autocast context the teacher runs in (``MODEL.TEACHER.DTYPE``); a no-op context
    (the caller's autocast, if any, applies) for float32."""
    dtype = getattr(teacher, "autocast_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---- the teacher's box logits, one function per kind of ROI heads -------------------------------


def _standard_logits(heads: StandardROIHeads, box_features, stage, cascade_stage):
    # One box head: it scores every stage's boxes, whatever CASCADE_SCORES says.
    return heads.box_predictor(heads.box_head(box_features))[0]


def _cascade_logits(heads: CascadeROIHeads, box_features, stage, cascade_stage):
    # CascadeROIHeads._run_stage on given boxes, in eval (no gradient scaling): stage k's box
    # head and predictor on the pooled features.
    def logits(k):
        return heads.box_predictor[k](heads.box_head[k](box_features))[0]

    if stage is None:
        stage = cascade_stage
    if stage is not None:
        return logits(stage)
    # detectron2's inference score: the mean over stages of softmax(logits). Handed on as the
    # logits log(mean p) (from log_softmax and logsumexp: finite), whose softmax is that mean.
    n = heads.num_cascade_stages
    log_p = torch.stack([F.log_softmax(logits(k).float(), dim=1) for k in range(n)])
    return torch.logsumexp(log_p, dim=0) - math.log(n)


# Most derived first: CascadeROIHeads is a StandardROIHeads.
TEACHER_LOGITS = ((CascadeROIHeads, _cascade_logits), (StandardROIHeads, _standard_logits))


def teacher_box_logits(
    heads,
    features: Dict[str, torch.Tensor],
    boxes: List[Boxes],
    stage: Optional[int] = None,
    cascade_stage: Optional[int] = None,
) -> torch.Tensor:
    """The teacher's box classifier logits, (R, K+1), for the given boxes.

    Args:
        heads: the teacher's ROI heads (``StandardROIHeads`` or ``CascadeROIHeads``).
        features: the teacher's backbone features ``{name: (N, C, H_l, W_l)}``.
        boxes: one ``Boxes`` per image (image coordinates), R in all.
        stage: the student's cascade stage these boxes come from: a Cascade teacher scores
            them with its own stage ``stage``; None for a student with one box head.
        cascade_stage: for ``stage`` None, the Cascade teacher's stage to use, or None for the
            mean of the stages' probabilities as ``log(mean softmax)``
            (``MODEL.TEACHER.CASCADE_SCORES``, :func:`parse_cascade_scores`).
    """
    for kind, fn in TEACHER_LOGITS:
        if isinstance(heads, kind):
            box_features = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
            return fn(heads, box_features, stage, cascade_stage)
    raise TypeError(
        f"The teacher's ROI heads are {type(heads).__name__}: its box logits are computed for "
        f"{[k.__name__ for k, _ in TEACHER_LOGITS]}."
    )


def check_logit_teacher(teacher, student_heads) -> None:
    """Raise TypeError/ValueError if ``teacher`` cannot score the student's boxes: its ROI heads
    must be a kind :func:`teacher_box_logits` knows, with ``FastRCNNOutputLayers`` predictors,
    and a Cascade teacher of a Cascade student must have as many stages as the student."""
    heads = getattr(teacher, "roi_heads", None)
    predictors = box_predictors(heads)
    known = any(isinstance(heads, kind) for kind, _ in TEACHER_LOGITS)
    if not known or not all(isinstance(p, FastRCNNOutputLayers) for p in predictors):
        raise TypeError(
            f"The teacher's ROI heads are {type(heads).__name__}, but a term reads the "
            "teacher's box logits, which need an ROI box head and FastRCNNOutputLayers "
            "predictor: the teacher must be a Faster/Mask R-CNN (StandardROIHeads) or a "
            "Cascade R-CNN (CascadeROIHeads), not e.g. RetinaNet."
        )
    student_stages = len(box_predictors(student_heads))
    if isinstance(heads, CascadeROIHeads) and student_stages > 1:
        if heads.num_cascade_stages != student_stages:
            raise ValueError(
                f"The Cascade student has {student_stages} stages and the Cascade teacher "
                f"{heads.num_cascade_stages}: stage k is distilled from the teacher's stage k, "
                "so both need the same number (MODEL.ROI_BOX_CASCADE_HEAD.IOUS)."
            )
