from .datasets import check_datasets, check_images, check_num_classes, register_coco_format
