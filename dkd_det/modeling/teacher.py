"""Building the frozen teacher: its own config, its own weights, checked before training."""
import logging
import os

from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads
from detectron2.utils.file_io import PathManager

__all__ = ["build_teacher", "get_teacher_cfg", "resolve_weights"]

logger = logging.getLogger(__name__)


def resolve_weights(path: str, key: str) -> str:
    """Return a local file for a weights path or URL, or raise an error that says what to do.

    Args:
        path: a file path, or a URL that detectron2's PathManager understands
            (``detectron2://``, ``https://``, ``file://``).
        key: the config key that holds ``path``, named in the error.
    """
    if os.path.isfile(path):
        return path
    if "://" in path:
        try:
            local = PathManager.get_local_path(path)
        except Exception as e:  # any download failure: offline, proxy, 404
            raise OSError(
                f"Could not fetch {key} = {path!r} ({type(e).__name__}: {e}). Without internet, "
                f"download it on a machine with internet (detectron2:// stands for "
                f"https://dl.fbaipublicfiles.com/detectron2/), copy the file here and set "
                f"{key} to its local path."
            ) from e
        if os.path.isfile(local):
            return local
    raise FileNotFoundError(f"{key} = {path!r}: no such file. Set {key} to an existing checkpoint file.")


def get_teacher_cfg(cfg):
    """The teacher's own detectron2 config, built from ``MODEL.TEACHER.CONFIG_FILE``.

    The file may be a model-zoo name (``COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml``) or
    a path; ``MODEL.TEACHER.OPTS`` is merged on top and the device is the student's.
    """
    from ..config import add_dkd_config

    path = cfg.MODEL.TEACHER.CONFIG_FILE
    if not path:
        raise ValueError(
            f"MODEL.DISTILL.TYPE is {cfg.MODEL.DISTILL.TYPE} but MODEL.TEACHER.CONFIG_FILE is empty. "
            "Set it to the teacher's detectron2 config (a path, or a model-zoo name such as "
            "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml), or set MODEL.DISTILL.TYPE NONE."
        )
    if not os.path.isfile(path):
        try:
            path = model_zoo.get_config_file(path)
        except RuntimeError:
            raise FileNotFoundError(
                f"MODEL.TEACHER.CONFIG_FILE = {path!r} is neither a file nor a detectron2 model-zoo "
                "config name (such as COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml)."
            ) from None
    tcfg = get_cfg()
    add_dkd_config(tcfg)  # so that a config written for dkd-det also reads as a teacher
    tcfg.merge_from_file(path)
    tcfg.merge_from_list(list(cfg.MODEL.TEACHER.OPTS))
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = cfg.MODEL.TEACHER.WEIGHTS
    tcfg.freeze()
    return tcfg


class _StrictCheckpointer(DetectionCheckpointer):
    """Loads the teacher and refuses any missing, unexpected or mis-shaped key:
    a partly random teacher would silently teach noise."""

    def _log_incompatible_keys(self, incompatible):
        problems = []
        if incompatible.missing_keys:
            problems.append(f"missing keys {incompatible.missing_keys[:10]}")
        if incompatible.unexpected_keys:
            problems.append(f"unexpected keys {incompatible.unexpected_keys[:10]}")
        if incompatible.incorrect_shapes:
            problems.append(
                "shape mismatches (key, in file, in model) "
                f"{[(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes[:10]]}"
            )
        if problems:
            raise ValueError(
                "The teacher's weights do not match the teacher's architecture: "
                + "; ".join(problems)
                + ". Check that MODEL.TEACHER.WEIGHTS was trained with MODEL.TEACHER.CONFIG_FILE "
                "(and MODEL.TEACHER.OPTS, e.g. the class count)."
            )


def build_teacher(cfg) -> GeneralizedRCNN:
    """Build, load, check and freeze the teacher described by ``cfg.MODEL.TEACHER``.

    Raises a clear error if the config or weights are missing, if the weights do not fit
    the architecture, if the teacher is not a two-stage R-CNN with a box predictor, or if
    its class count differs from the student's ``MODEL.ROI_HEADS.NUM_CLASSES``.

    Returns:
        the teacher in eval mode with ``requires_grad=False`` on every parameter.
    """
    tcfg = get_teacher_cfg(cfg)
    if not cfg.MODEL.TEACHER.WEIGHTS:
        raise ValueError(
            "MODEL.TEACHER.WEIGHTS is empty: a randomly initialised teacher teaches nothing. "
            "Set it to the teacher's trained checkpoint (a path or a detectron2:// URL)."
        )
    weights = resolve_weights(cfg.MODEL.TEACHER.WEIGHTS, "MODEL.TEACHER.WEIGHTS")
    teacher = build_model(tcfg)
    heads = getattr(teacher, "roi_heads", None)
    if not (
        isinstance(teacher, GeneralizedRCNN)
        and isinstance(heads, StandardROIHeads)
        and isinstance(getattr(heads, "box_predictor", None), FastRCNNOutputLayers)
    ):
        raise TypeError(
            f"The teacher ({tcfg.MODEL.META_ARCHITECTURE} with "
            f"{tcfg.MODEL.ROI_HEADS.NAME if heads is not None else 'no ROI heads'}) is not a "
            "two-stage R-CNN with an ROI box predictor: DKD distils the box head's classification "
            "logits, so the teacher must be a Faster/Mask R-CNN (GeneralizedRCNN with "
            "StandardROIHeads), not e.g. RetinaNet or Cascade R-CNN."
        )
    if heads.num_classes != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(
            f"The teacher predicts {heads.num_classes} classes but the student "
            f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES} (MODEL.ROI_HEADS.NUM_CLASSES): their logits cannot be "
            "compared. Use a teacher trained on the student's classes, or set "
            "MODEL.ROI_HEADS.NUM_CLASSES to match."
        )
    _StrictCheckpointer(teacher).load(weights)
    logger.info("Teacher %s loaded from %s", tcfg.MODEL.META_ARCHITECTURE, weights)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
