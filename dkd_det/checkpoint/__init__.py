"""Converting ImageNet weights from other libraries into detectron2's backbone format."""
from .convert import CONVERTERS, convert_torchvision, load_torchvision_state_dict, missing_weights_hint, save_d2_pkl

__all__ = ["CONVERTERS", "convert_torchvision", "load_torchvision_state_dict", "missing_weights_hint", "save_d2_pkl"]
