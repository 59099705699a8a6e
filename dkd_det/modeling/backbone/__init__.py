"""Backbones detectron2 does not ship, registered in its ``BACKBONE_REGISTRY`` on import."""

from .mobilenet_v2 import MobileNetV2, build_mobilenet_v2_backbone, build_mobilenet_v2_fpn_backbone

__all__ = ["MobileNetV2", "build_mobilenet_v2_backbone", "build_mobilenet_v2_fpn_backbone"]
