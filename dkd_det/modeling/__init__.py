from .backbone import MobileNetV2, build_mobilenet_v2_backbone, build_mobilenet_v2_fpn_backbone
from .cascade import DistillCascadeROIHeads
from .meta_arch import TRAINING_ONLY_PREFIXES, DistillationRCNN
from .roi_heads import DistillROIHeads
from .teacher import (
    build_teacher,
    check_teacher_cfg,
    get_teacher_cfg,
    parse_cascade_scores,
    teacher_box_logits,
)
