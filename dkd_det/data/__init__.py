from .datasets import check_datasets, check_images, check_num_classes, register_coco_format
from .images import BrokenImageError, CheckedDatasetMapper, find_broken_images, image_problem
from .metadata import METADATA_FILE, classes_from_coco_json, dataset_metadata, save_metadata

__all__ = [
    "check_datasets",
    "check_images",
    "check_num_classes",
    "register_coco_format",
    "BrokenImageError",
    "CheckedDatasetMapper",
    "find_broken_images",
    "image_problem",
    "classes_from_coco_json",
    "dataset_metadata",
    "METADATA_FILE",
    "save_metadata",
]
