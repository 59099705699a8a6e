from .hooks import TeacherCheck
from .predictor import Predictor, load_student
from .trainer import Trainer

__all__ = ["Predictor", "TeacherCheck", "Trainer", "load_student"]
