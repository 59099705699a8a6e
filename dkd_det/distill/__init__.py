"""Distillation terms: the registry (:mod:`.base`) and one module per method."""

from .base import (
    DISTILL_TERM_REGISTRY,
    PLUGINS_ENV,
    DistillInputs,
    DistillTerm,
    add_distill_config,
    build_distill_terms,
    check_distill_config,
    explain_unknown_key,
    load_plugins,
    registered_terms,
    term_names,
)
from .cwd import CWD
from .dkd import DKD
from .fgd import FGD
from .kd import KD
from .logits import (
    LogitTerm,
    box_predictors,
    check_softmax_classifier,
    check_softmax_predictor,
    classifier_flags,
)
from .mgd import MGD
from .pkd import PKD
from .reviewkd import ABF, ReviewKD

__all__ = [
    "DISTILL_TERM_REGISTRY",
    "PLUGINS_ENV",
    "DistillInputs",
    "DistillTerm",
    "LogitTerm",
    "add_distill_config",
    "build_distill_terms",
    "check_distill_config",
    "explain_unknown_key",
    "check_softmax_classifier",
    "check_softmax_predictor",
    "box_predictors",
    "classifier_flags",
    "load_plugins",
    "registered_terms",
    "term_names",
    "DKD",
    "KD",
    "ABF",
    "ReviewKD",
    "PKD",
    "CWD",
    "FGD",
    "MGD",
]
