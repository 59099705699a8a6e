from .hooks import TeacherCheck
from .launcher import (
    LostPeerError,
    argument_parser,
    launch,
    restart_count,
    resume_or_load,
    settle_collectives,
)
from .predictor import Predictor, load_student
from .trainer import Trainer

__all__ = [
    "LostPeerError",
    "Predictor",
    "TeacherCheck",
    "Trainer",
    "argument_parser",
    "launch",
    "load_student",
    "restart_count",
    "resume_or_load",
    "settle_collectives",
]
