"""Exporting a trained student: as a plain detectron2 model (config + student-only weights), and
as TorchScript or ONNX files with the runtime that feeds them and the check that they reproduce
the PyTorch student."""

from . import deploy, student
from .deploy import *  # noqa: F401,F403
from .student import *  # noqa: F401,F403

__all__ = deploy.__all__ + student.__all__
