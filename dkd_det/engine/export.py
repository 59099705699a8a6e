"""Export a trained student as a plain detectron2 model: a config that vanilla detectron2
reads (no dkd-det keys) and a student-only checkpoint, for tools/export_student.py."""
import json
import logging
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model

from ..config import get_dkd_cfg
from ..modeling import resolve_weights
from .inference import METADATA_FILE, dataset_metadata

__all__ = ["plain_detectron2_cfg", "load_student", "export_student", "checkpoint_size"]

logger = logging.getLogger(__name__)

# dkd-det's own components -> the detectron2 components they reduce to in inference.
_PLAIN_NAMES = {
    ("META_ARCHITECTURE",): {"DistillationRCNN": "GeneralizedRCNN"},
    ("ROI_HEADS", "NAME"): {"DistillROIHeads": "StandardROIHeads"},
}


def _check_keys(cfg: CfgNode, reference: CfgNode, prefix: str = "") -> None:
    for key, value in cfg.items():
        if key not in reference:
            raise KeyError(f"{prefix}{key} is not a detectron2 config key: the exported config would not load in vanilla detectron2.")
        if isinstance(value, CfgNode):
            _check_keys(value, reference[key], f"{prefix}{key}.")


def plain_detectron2_cfg(cfg: CfgNode, weights: str = "") -> CfgNode:
    """The student's config as plain detectron2: ``GeneralizedRCNN`` with ``StandardROIHeads``,
    without ``MODEL.DISTILL``, ``MODEL.TEACHER`` and ``DATASETS.COCO_FORMAT``, and with
    ``MODEL.WEIGHTS = weights``. Raises KeyError if any key would be unknown to vanilla detectron2."""
    plain = cfg.clone()
    plain.defrost()
    for path, names in _PLAIN_NAMES.items():
        node = plain.MODEL
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = names.get(node[path[-1]], node[path[-1]])
    for node, key in ((plain.MODEL, "DISTILL"), (plain.MODEL, "TEACHER"), (plain.DATASETS, "COCO_FORMAT")):
        node.pop(key, None)
    # dkd-det's MobileNetV2 keys: meaningless for detectron2's own backbones. A MobileNetV2
    # student keeps them (and needs `import dkd_det` to load), so _check_keys names them.
    if "mobilenet" not in plain.MODEL.BACKBONE.NAME:
        plain.MODEL.pop("MOBILENET", None)
    plain.MODEL.WEIGHTS = weights
    _check_keys(plain, get_cfg())
    plain.freeze()
    return plain


class _IncompatibleKeys(DetectionCheckpointer):
    """Records the keys that did not load instead of only logging them."""

    incompatible = None

    def _log_incompatible_keys(self, incompatible):
        self.incompatible = incompatible
        super()._log_incompatible_keys(incompatible)


def load_student(config_file: str, weights: Optional[str] = None, opts=()) -> Tuple[CfgNode, torch.nn.Module]:
    """The student of a dkd-det (or plain) config, on the CPU in eval mode, with its trained weights.

    Args:
        weights: the checkpoint; None for the config's ``MODEL.WEIGHTS``.

    Raises:
        FileNotFoundError: missing config or weights.
        ValueError: the checkpoint does not fit the student (a partly random export would be wrong).
    """
    cfg = get_dkd_cfg(config_file, opts)
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("No weights: pass --weights (e.g. output/dkd_r101_r18/model_final.pth) or set MODEL.WEIGHTS.")
    local = resolve_weights(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
    cfg.MODEL.DISTILL.TYPE = "NONE"  # the student alone: the teacher is neither built nor loaded
    build_cfg = cfg.clone()
    build_cfg.MODEL.DEVICE = "cpu"
    model = build_model(build_cfg)
    checkpointer = _IncompatibleKeys(model)
    checkpointer.load(local)
    bad = checkpointer.incompatible
    if bad is not None and (bad.missing_keys or bad.unexpected_keys or bad.incorrect_shapes):
        raise ValueError(
            f"{local} does not fit the student of {config_file}: missing {bad.missing_keys[:5]}, "
            f"unexpected {bad.unexpected_keys[:5]}, wrong shapes {[k for k, *_ in bad.incorrect_shapes[:5]]}. "
            "Export the checkpoint with the config it was trained with."
        )
    model.eval()
    cfg.freeze()
    return cfg, model


def checkpoint_size(path: str) -> Dict[str, float]:
    """Size of a checkpoint file: ``{"mb": file size in MB (1e6 bytes), "params": number of
    values in its model state (parameters and BN statistics)}``."""
    data = DetectionCheckpointer(torch.nn.Module())._load_file(path) if path.endswith(".pkl") else torch.load(path, map_location="cpu")
    state = data.get("model", data) if isinstance(data, dict) else {}
    params = sum(
        v.numel() if torch.is_tensor(v) else np.asarray(v).size
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    )
    return {"mb": os.path.getsize(path) / 1e6, "params": params}


def export_student(config_file: str, output_dir: str, weights: Optional[str] = None, opts=()) -> Dict[str, str]:
    """Write ``output_dir/config.yaml`` (plain detectron2) and ``output_dir/model_final.pth``
    (``{"model": student state_dict}``, CPU tensors); also ``output_dir/metadata.json`` with the
    class names when the test dataset's names are known (a plain config cannot hold them).

    Returns:
        {"config": path, "weights": path, "teacher_weights": local teacher file or ""}.
    """
    cfg, model = load_student(config_file, weights, opts)
    os.makedirs(output_dir, exist_ok=True)
    weights_out = os.path.abspath(os.path.join(output_dir, "model_final.pth"))
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "__author__": "dkd-det export"}, weights_out)
    config_out = os.path.join(output_dir, "config.yaml")
    with open(config_out, "w") as f:
        f.write(plain_detectron2_cfg(cfg, weights_out).dump())
    classes = dataset_metadata(cfg).get("thing_classes", None)
    if classes is not None:
        with open(os.path.join(output_dir, METADATA_FILE), "w") as f:
            json.dump({"thing_classes": list(classes)}, f)
    teacher = ""
    if cfg.MODEL.TEACHER.WEIGHTS:
        try:
            teacher = resolve_weights(cfg.MODEL.TEACHER.WEIGHTS, "MODEL.TEACHER.WEIGHTS")
        except OSError as e:
            logger.warning("Teacher's weights not available, their size is not reported: %s", e)
    return {"config": config_out, "weights": weights_out, "teacher_weights": teacher}
