"""Export a trained student as a plain detectron2 model: a config that vanilla detectron2
reads (no dkd-det keys) and a student-only checkpoint."""

import os
from typing import Dict

import torch
from detectron2.config import CfgNode, get_cfg

from ..modeling import TRAINING_ONLY_PREFIXES

__all__ = ["plain_detectron2_cfg", "export_student", "student_state_dict"]

# dkd-det's own components -> the detectron2 components they reduce to in inference.
_PLAIN_NAMES = {
    ("META_ARCHITECTURE",): {"DistillationRCNN": "GeneralizedRCNN"},
    ("ROI_HEADS", "NAME"): {
        "DistillROIHeads": "StandardROIHeads",
        "DistillCascadeROIHeads": "CascadeROIHeads",
    },
}


def _check_keys(cfg: CfgNode, reference: CfgNode, prefix: str = "") -> None:
    for key, value in cfg.items():
        if key not in reference:
            raise KeyError(
                f"{prefix}{key} is not a detectron2 config key: the exported config would not "
                "load in vanilla detectron2."
            )
        if isinstance(value, CfgNode):
            _check_keys(value, reference[key], f"{prefix}{key}.")


def plain_detectron2_cfg(cfg: CfgNode, weights: str = "") -> CfgNode:
    """The student's config as plain detectron2: ``GeneralizedRCNN`` with ``StandardROIHeads``
    (``CascadeROIHeads`` for a Cascade student),
    without ``MODEL.DISTILL``, ``MODEL.TEACHER``, ``MODEL.WEIGHTS_SHA256``,
    ``DATASETS.COCO_FORMAT``, ``DATALOADER.SKIP_BROKEN_IMAGES`` and ``TEST.IMS_PER_BATCH``, and with
    ``MODEL.WEIGHTS = weights``. Raises KeyError if any key would be unknown to vanilla
    detectron2."""
    plain = cfg.clone()
    plain.defrost()
    for path, names in _PLAIN_NAMES.items():
        node = plain.MODEL
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = names.get(node[path[-1]], node[path[-1]])
    for node, key in (
        (plain.MODEL, "DISTILL"),
        (plain.MODEL, "TEACHER"),
        (plain.MODEL, "WEIGHTS_SHA256"),  # the pin of the trained file, not of the export
        (plain.DATASETS, "COCO_FORMAT"),
        (plain.DATALOADER, "SKIP_BROKEN_IMAGES"),
        (plain.TEST, "IMS_PER_BATCH"),
    ):
        node.pop(key, None)
    # dkd-det's MobileNetV2 keys: meaningless for detectron2's own backbones. A MobileNetV2
    # student keeps them (and needs `import dkd_det` to load), so _check_keys names them.
    if "mobilenet" not in plain.MODEL.BACKBONE.NAME:
        plain.MODEL.pop("MOBILENET", None)
    plain.MODEL.WEIGHTS = weights
    _check_keys(plain, get_cfg())
    plain.freeze()
    return plain


def student_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` without the keys of training-only modules (:data:`TRAINING_ONLY_PREFIXES`):
    what a vanilla detectron2 model of the student's config holds."""
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}


def export_student(cfg: CfgNode, model: torch.nn.Module, output_dir: str) -> Dict[str, str]:
    """Write ``output_dir/config.yaml`` (plain detectron2) and ``output_dir/model_final.pth``
    (``{"model": student state_dict}``, CPU tensors, without training-only modules such as
    ReviewKD's ABF: :func:`student_state_dict`). The class names, which a plain config
    cannot hold, go beside them with :func:`dkd_det.data.save_metadata`.

    Args:
        cfg: the student's config (see :func:`dkd_det.config.student_cfg`).
        model: the trained student (see :func:`dkd_det.engine.load_student`).

    Returns:
        {"config": path, "weights": path}.
    """
    plain = plain_detectron2_cfg(cfg)  # fails before anything is written
    os.makedirs(output_dir, exist_ok=True)
    weights_out = os.path.abspath(os.path.join(output_dir, "model_final.pth"))
    state = {k: v.detach().cpu() for k, v in student_state_dict(model.state_dict()).items()}
    torch.save({"model": state, "__author__": "dkd-det export"}, weights_out)
    plain.defrost()
    plain.MODEL.WEIGHTS = weights_out
    config_out = os.path.join(output_dir, "config.yaml")
    with open(config_out, "w") as f:
        f.write(plain.dump())
    return {"config": config_out, "weights": weights_out}
