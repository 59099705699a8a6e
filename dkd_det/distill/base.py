"""The registry of distillation terms, what a term may read, and the keys every term shares.

A distillation method is one *term*: an ``nn.Module`` subclass of :class:`DistillTerm`
registered in :data:`DISTILL_TERM_REGISTRY`. A config lists the terms it trains with,

    MODEL.DISTILL.TERMS: ["DKD", "REVIEWKD"]      # any number; [] is the plain student

and each term owns a config node ``MODEL.DISTILL.<NAME>`` (the registered name, upper case):
``LOSS_WEIGHT`` and ``WARMUP_ITERS``, which every term has (:meth:`DistillTerm.add_config`),
plus the keys its class adds in :meth:`DistillTerm.add_term_config`. ``add_dkd_config`` calls
:func:`add_distill_config`, which adds the node of every term registered at that moment: a
term from outside the package is registered by importing its module first (in Python, or for
the tools with ``DKD_DET_PLUGINS``, see :func:`load_plugins`).

A term declares in :attr:`DistillTerm.reads` which fields of :class:`DistillInputs` it reads;
the meta-architecture computes each field once per step for all terms, and the teacher's box
head runs only if some term reads ``teacher_logits``. The term returns its losses, unweighted;
:meth:`DistillTerm.forward` multiplies them by the term's loss weight and warm-up.

Where the modules live: the terms are the submodule ``distill_terms`` of
:class:`dkd_det.modeling.DistillationRCNN`, so that parameters they own (ReviewKD's ABF) are
optimised, synchronised by DDP and resumed with the student. The student alone
(:func:`dkd_det.config.student_cfg`) builds no term, and strict student loading and the export
drop their keys (``dkd_det.modeling.TRAINING_ONLY_PREFIXES``).
"""

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, FrozenSet, List, Optional

import torch
from detectron2.config import CfgNode as CN
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from detectron2.utils.registry import Registry
from torch import nn

__all__ = [
    "DISTILL_TERM_REGISTRY",
    "DistillInputs",
    "DistillTerm",
    "add_distill_config",
    "build_distill_terms",
    "check_distill_config",
    "explain_unknown_key",
    "registered_terms",
    "term_names",
    "load_plugins",
    "PLUGINS_ENV",
]

logger = logging.getLogger(__name__)

DISTILL_TERM_REGISTRY = Registry("DISTILL_TERM")
DISTILL_TERM_REGISTRY.__doc__ = """
Distillation terms (see :mod:`dkd_det.distill.base`): subclasses of :class:`DistillTerm`,
built as ``cls(cfg, student, teacher)`` and called with :class:`DistillInputs`.
"""

# Modules (names or .py paths, separated by commas) imported by get_dkd_cfg before it builds a
# config, so that the tools know terms defined outside dkd_det.
PLUGINS_ENV = "DKD_DET_PLUGINS"


@dataclass
class DistillInputs:
    """What a term may read in one training step, each computed once for all terms.

    Shapes: N images, R sampled regions over all images, K classes (+1 background).

    For a Cascade R-CNN student (``DistillCascadeROIHeads``) a term that reads a box field is
    called once per stage, with the box fields of that stage (its boxes, labels, the student's
    stage logits and the teacher's logits for those boxes) and the same features; its losses are
    renamed ``<name>_stage<k>``. A term need not know about stages.

    Attributes:
        images: the student's preprocessed batch (``images.tensor``: (N, 3, H, W)).
        student_features, teacher_features: ``{name: (N, C, H_l, W_l)}`` backbone outputs;
            the teacher's from its one backbone pass without grad, on its own normalisation.
        gt_instances: the ground truth of each image (``gt_boxes``, ``gt_classes``; image
            pixels of the student's input).
        boxes: the sampled proposal boxes of each image (XYXY, image pixels), ``R`` in all.
        gt_classes: (R,) int64 class of each sampled box, ``K`` for background.
        student_logits: (R, K+1) the student's box classifier logits, from the single student
            box-head pass that also feeds its detection losses.
        teacher_logits: (R, K+1) the teacher's box classifier logits for the same boxes (no
            grad); computed only if a term reads it.
    """

    images: ImageList
    student_features: Dict[str, torch.Tensor]
    teacher_features: Dict[str, torch.Tensor]
    gt_instances: List[Instances]
    boxes: Optional[List[Boxes]] = None
    gt_classes: Optional[torch.Tensor] = None
    student_logits: Optional[torch.Tensor] = None
    teacher_logits: Optional[torch.Tensor] = None


FIELDS = frozenset(f.name for f in fields(DistillInputs))
# The fields that come from the ROI heads' sampling and box-head pass.
BOX_FIELDS = frozenset({"boxes", "gt_classes", "student_logits", "teacher_logits"})


class DistillTerm(nn.Module):
    """Base class of distillation terms.

    A subclass sets :attr:`reads`, adds its own keys in :meth:`add_term_config`, reads them
    in ``from_config`` (detectron2's ``@configurable`` convention: ``from_config(cls, cfg,
    student, teacher)`` returns the ``__init__`` kwargs; :meth:`term_config` is its node),
    checks in it what it needs of the two models, and implements :meth:`losses`.

    ``student`` has the student's built ``backbone`` and ``roi_heads`` (the
    ``GeneralizedRCNN`` attributes); ``teacher`` is the frozen teacher model.
    """

    #: The :class:`DistillInputs` fields that :meth:`losses` reads.
    reads: FrozenSet[str] = frozenset()
    #: Default of ``MODEL.DISTILL.<NAME>.LOSS_WEIGHT``.
    default_loss_weight: float = 1.0

    def __init__(self, *, loss_weight: float = 1.0, warmup_iters: int = 0, name: str = ""):
        """
        Args:
            loss_weight: multiplies every loss of the term, >= 0.
            warmup_iters: the weight ramps linearly from 0 to ``loss_weight`` over this many
                iterations (0: no warm-up), >= 0.
            name: the term's config name, for messages (``MODEL.DISTILL.<name>``).
        """
        super().__init__()
        self.term_name = name or type(self).__name__.upper()
        for key, value in (("LOSS_WEIGHT", loss_weight), ("WARMUP_ITERS", warmup_iters)):
            if value < 0:
                raise ValueError(f"MODEL.DISTILL.{self.term_name}.{key} = {value}: must be >= 0.")
        unknown = set(self.reads) - FIELDS
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.reads names {sorted(unknown)}, which DistillInputs does "
                f"not have; its fields are {sorted(FIELDS)}."
            )
        self.loss_weight = loss_weight
        self.warmup_iters = warmup_iters

    @classmethod
    def add_config(cls, cfg: CN, name: str) -> None:
        """Add ``MODEL.DISTILL.<name>`` with the shared ``LOSS_WEIGHT`` and ``WARMUP_ITERS``
        and the term's own keys (:meth:`add_term_config`)."""
        node = CN()
        # Multiplies every loss of the term.
        node.LOSS_WEIGHT = cls.default_loss_weight
        # The weight ramps linearly from 0 to LOSS_WEIGHT over this many iterations (0: none).
        node.WARMUP_ITERS = 0
        cls.add_term_config(node)
        cfg.MODEL.DISTILL[name] = node
        for old, new in cls.renamed_keys().items():
            cfg.register_renamed_key(old, new, message=_RENAMED_NOTE)

    @classmethod
    def add_term_config(cls, node: CN) -> None:
        """Add the term's own keys to its node ``MODEL.DISTILL.<NAME>`` (in place)."""

    @classmethod
    def renamed_keys(cls) -> Dict[str, str]:
        """Keys of older dkd-det configs that are now the term's: {old full key: new}."""
        return {}

    @classmethod
    def check_config(cls, cfg: CN, teacher_cfg: CN) -> None:
        """Raise a clear error if the student's ``cfg`` or the teacher's ``teacher_cfg`` cannot
        train with this term; called before any model is built (checks of the built models
        belong in ``from_config``). ``teacher_cfg`` is a yacs ``CfgNode`` for a yaml teacher, an
        omegaconf LazyConfig (its ``model`` node) for a ``.py`` one."""

    @classmethod
    def term_config(cls, cfg: CN) -> CN:
        """The term's node ``MODEL.DISTILL.<NAME>`` in ``cfg``."""
        return cfg.MODEL.DISTILL[cls.__name__.upper()]

    @classmethod
    def shared_kwargs(cls, cfg: CN) -> Dict[str, Any]:
        """The base-class kwargs (loss weight, warm-up, name) from the term's node."""
        node = cls.term_config(cfg)
        return {
            "loss_weight": node.LOSS_WEIGHT,
            "warmup_iters": node.WARMUP_ITERS,
            "name": cls.__name__.upper(),
        }

    @classmethod
    def feature_levels(cls, cfg: CN, student, teacher, same_channels: bool):
        """:func:`dkd_det.distill.feature_losses.feature_levels` of the term's ``IN_FEATURES``
        on the two models' backbones: (names, student channels, teacher channels, strides)."""
        from .feature_losses import feature_levels

        return feature_levels(
            cls.__name__.upper(),
            cls.term_config(cfg).IN_FEATURES,
            student.backbone.output_shape(),
            teacher.backbone.output_shape(),
            same_channels=same_channels,
        )

    def weight(self) -> float:
        """The loss weight at the current iteration (the event storage's), warm-up applied."""
        weight = self.loss_weight
        if self.warmup_iters > 0:
            weight *= min(1.0, (get_event_storage().iter + 1) / self.warmup_iters)
        return weight

    def losses(self, inputs: DistillInputs) -> Dict[str, torch.Tensor]:
        """The term's unweighted losses, ``{"loss_<name>": float32 scalar}``."""
        raise NotImplementedError

    def forward(self, inputs: DistillInputs) -> Dict[str, torch.Tensor]:
        """:meth:`losses`, each multiplied by :meth:`weight`."""
        weight = self.weight()
        return {key: weight * value for key, value in self.losses(inputs).items()}


_RENAMED_NOTE = (
    "dkd-det's distillation keys are now one node per term: MODEL.DISTILL.TERMS lists the "
    "terms (e.g. ['DKD'], ['DKD', 'REVIEWKD'], [] for none), and each term's keys, LOSS_WEIGHT "
    "and WARMUP_ITERS included, are under MODEL.DISTILL.<TERM>."
)

# Keys of the older layout (one logit TYPE and one FEATURE term) that no single term owns.
_RENAMED_SHARED = {
    "MODEL.DISTILL.TYPE": "MODEL.DISTILL.TERMS",
    "MODEL.DISTILL.LOSS_WEIGHT": "MODEL.DISTILL.<TERM>.LOSS_WEIGHT",
    "MODEL.DISTILL.WARMUP_ITERS": "MODEL.DISTILL.<TERM>.WARMUP_ITERS",
    "MODEL.DISTILL.TEMPERATURE": "MODEL.DISTILL.<TERM>.TEMPERATURE",
    "MODEL.DISTILL.FEATURE": "MODEL.DISTILL.TERMS and MODEL.DISTILL.<TERM>",
    "MODEL.DISTILL.FEATURE.TYPE": "MODEL.DISTILL.TERMS",
    "MODEL.DISTILL.FEATURE.LOSS_WEIGHT": "MODEL.DISTILL.<TERM>.LOSS_WEIGHT",
}


def registered_terms() -> Dict[str, type]:
    """{config name (upper case): class} of every registered term."""
    return {name.upper(): cls for name, cls in DISTILL_TERM_REGISTRY}


def add_distill_config(cfg: CN) -> None:
    """Add ``MODEL.DISTILL`` (``TERMS`` and one node per registered term) to ``cfg``."""
    cfg.MODEL.DISTILL = CN()
    # The terms trained with, by registered name (case-insensitive), e.g. ["DKD"] or
    # ["DKD", "REVIEWKD"]; [] trains the plain student (no teacher is built or loaded).
    cfg.MODEL.DISTILL.TERMS = []
    for name, cls in sorted(registered_terms().items()):
        cls.add_config(cfg, name)
    for old, new in _RENAMED_SHARED.items():
        cfg.register_renamed_key(old, new, message=_RENAMED_NOTE)


def term_names(cfg: CN) -> List[str]:
    """``MODEL.DISTILL.TERMS`` as registered names (upper case), checked: an unknown or
    repeated name is a ValueError that lists the registered ones."""
    terms = [str(t).upper() for t in cfg.MODEL.DISTILL.TERMS]
    known = registered_terms()
    unknown = [t for t in terms if t not in known]
    if unknown or len(set(terms)) != len(terms):
        raise ValueError(
            f"MODEL.DISTILL.TERMS = {list(cfg.MODEL.DISTILL.TERMS)}: "
            + (f"{unknown} not registered" if unknown else "a term is listed twice")
            + f"; the registered terms are {sorted(known)} (DISTILL_TERM_REGISTRY; a term "
            f"defined outside dkd_det is registered by importing its module, e.g. with "
            f"{PLUGINS_ENV})."
        )
    return terms


def explain_unknown_key(error: KeyError) -> str:
    """yacs' message for an unknown key, with the registered terms and how to register one
    added when the key is under ``MODEL.DISTILL``."""
    message = str(error.args[0]) if error.args else str(error)
    if "Non-existent" in message and "MODEL.DISTILL." in message:
        message += (
            f": no registered term has this key; the registered terms are "
            f"{sorted(registered_terms())} (each with its node MODEL.DISTILL.<TERM>). A term "
            f"defined outside dkd_det is registered by importing its module first, for the tools "
            f"with the environment variable {PLUGINS_ENV}=my_terms.py (or a module name)."
        )
    return message


def check_distill_config(cfg: CN, teacher_cfg: CN) -> None:
    """Every listed term's :meth:`DistillTerm.check_config`, before any model is built."""
    known = registered_terms()
    for name in term_names(cfg):
        known[name].check_config(cfg, teacher_cfg)


def build_distill_terms(cfg: CN, student: Any, teacher: nn.Module) -> nn.ModuleDict:
    """The terms of ``MODEL.DISTILL.TERMS``, in that order, keyed by lower-case name.

    Args:
        student: has the student's built ``backbone`` and ``roi_heads``.
        teacher: the frozen teacher.
    """
    known = registered_terms()
    return nn.ModuleDict(
        {name.lower(): known[name](cfg, student, teacher) for name in term_names(cfg)}
    )


def load_plugins(spec: Optional[str] = None) -> List[str]:
    """Import the modules that define distillation terms outside dkd_det.

    Args:
        spec: module names or ``.py`` file paths separated by commas; by default the
            environment variable ``DKD_DET_PLUGINS``. A module already imported is not
            imported again.

    Returns:
        the names of the modules imported.
    """
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    done = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item.endswith(".py"):
            path = os.path.abspath(item)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{PLUGINS_ENV}: no such file {item!r}.")
            name = "dkd_det_plugin_" + os.path.splitext(os.path.basename(path))[0]
            if name not in _PLUGINS:
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
                _PLUGINS[name] = module
        else:
            name = item
            importlib.import_module(name)
        done.append(name)
    if done:
        logger.info("Imported distillation plugins: %s", ", ".join(done))
    return done


_PLUGINS: Dict[str, Any] = {}
