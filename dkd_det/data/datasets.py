"""Dataset registration from the config, and the checks that turn a missing file into
an error that says where the file should be."""

import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["register_coco_format", "check_datasets", "check_num_classes", "check_images"]

_BUILTIN_HINT = (
    "detectron2's builtin COCO datasets are read from $DETECTRON2_DATASETS (now {root!r}), "
    "laid out as coco/annotations/instances_{{train,val}}2017.json and coco/{{train,val}}2017/. "
    "For your own COCO-format data use DATASETS.COCO_FORMAT [[name, json_file, image_root]]."
)


def register_coco_format(cfg) -> None:
    """Register every ``(name, json_file, image_root)`` of ``cfg.DATASETS.COCO_FORMAT`` with
    detectron2 (as ``register_coco_instances`` would), once per process."""
    for entry in cfg.DATASETS.COCO_FORMAT:
        if len(entry) != 3:
            raise ValueError(
                f"DATASETS.COCO_FORMAT entries are (name, json_file, image_root); got {entry!r}"
            )
        name, json_file, image_root = entry
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
                continue
            raise ValueError(
                f"Dataset name {name!r} is already registered with other files; pick another name."
            )
        register_coco_instances(name, {}, json_file, image_root)


def check_datasets(cfg) -> None:
    """Fail early, naming the expected path, when a dataset of ``DATASETS.TRAIN/TEST`` is not
    registered or its annotation file or image folder is missing."""
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name not in DatasetCatalog.list():
            raise KeyError(
                f"Dataset {name!r} is not registered. " + _BUILTIN_HINT.format(root=root)
            )
        meta = MetadataCatalog.get(name)
        for key, exists in (("json_file", os.path.isfile), ("image_root", os.path.isdir)):
            path = meta.get(key, None)
            if path and not exists(path):
                raise FileNotFoundError(
                    f"Dataset {name!r}: {key} {path!r} does not exist. "
                    + _BUILTIN_HINT.format(root=root)
                )


def check_num_classes(cfg) -> None:
    """The student's ``MODEL.ROI_HEADS.NUM_CLASSES`` must equal the class count of each
    training dataset (known once its annotations were loaded)."""
    for name in cfg.DATASETS.TRAIN:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ValueError(
                f"Dataset {name!r} has {len(classes)} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}; set it to {len(classes)} (and use a teacher "
                "trained on the same classes)."
            )


def check_images(dataset_dicts, names) -> None:
    """Every image that the annotations of ``names`` list (``file_name`` of each record of
    ``dataset_dicts``) must exist on disk."""
    missing = [d["file_name"] for d in dataset_dicts if not os.path.isfile(d["file_name"])]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(dataset_dicts)} images listed in the annotations of "
            f"{list(names)} are missing, e.g. {missing[:3]}. "
            "Check the image root (the third item of "
            "DATASETS.COCO_FORMAT, or $DETECTRON2_DATASETS for builtin datasets) and that the "
            "images were copied completely."
        )
