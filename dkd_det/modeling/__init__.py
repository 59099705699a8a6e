from .meta_arch import DistillationRCNN
from .roi_heads import DistillROIHeads
from .teacher import build_teacher, get_teacher_cfg, resolve_weights
