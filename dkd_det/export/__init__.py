"""Exporting a trained student: as a plain detectron2 model (config + student-only weights), and
as TorchScript or ONNX files with the runtime that feeds them and the check that they reproduce
the PyTorch student."""

from .deploy import (
    DEPLOY_EXTRA_HINT,
    DEPLOY_FILE,
    DEPLOY_FORMATS,
    ONNX_OPSET,
    DeployCheckError,
    DeployedModel,
    Detections,
    MissingDeployExtra,
    Tolerances,
    check_deployed,
    compare_detections,
    export_deployable,
    export_onnx,
    export_torchscript,
    pytorch_detections,
    require_onnx,
    resize_for_model,
    sample_inputs,
)
from .student import export_student, plain_detectron2_cfg, student_state_dict

__all__ = [
    "DEPLOY_EXTRA_HINT",
    "DEPLOY_FILE",
    "DEPLOY_FORMATS",
    "ONNX_OPSET",
    "DeployCheckError",
    "DeployedModel",
    "Detections",
    "MissingDeployExtra",
    "Tolerances",
    "check_deployed",
    "compare_detections",
    "export_deployable",
    "export_onnx",
    "export_torchscript",
    "pytorch_detections",
    "require_onnx",
    "resize_for_model",
    "sample_inputs",
    "export_student",
    "plain_detectron2_cfg",
    "student_state_dict",
]
