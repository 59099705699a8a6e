from .backbone import MobileNetV2, build_mobilenet_v2_backbone, build_mobilenet_v2_fpn_backbone
from .meta_arch import TRAINING_ONLY_PREFIXES, DistillationRCNN
from .roi_heads import DistillROIHeads
from .teacher import build_teacher, get_teacher_cfg
