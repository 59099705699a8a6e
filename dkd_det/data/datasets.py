"""Dataset registration from the config, and the checks that turn a missing file into
an error that says where the file should be."""

import logging
import os
import time
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .images import MISSING, BrokenImageError, find_broken_images

__all__ = ["register_coco_format", "check_datasets", "check_num_classes", "check_images"]

logger = logging.getLogger(__name__)

# A warning for skipped files names this many (an error names `listed`, 10 by default).
_LISTED_WHEN_SKIPPED = 100

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


def check_images(
    dataset_dicts, names, skip_broken: bool = False, training: bool = True, listed: int = 10
) -> List[str]:
    """Every image that the annotations of ``names`` list (``file_name`` of each record of
    ``dataset_dicts``) must exist and decode (:func:`~dkd_det.data.images.image_problem`).

    Args:
        names: the datasets ``dataset_dicts`` came from, named in the message.
        skip_broken: warn (naming the files) instead of raising, for a training set with
            ``DATALOADER.SKIP_BROKEN_IMAGES``; it is still an error if no image is usable.
        training: False for a test set, which is never skipped: AP over fewer images would
            not be comparable.
        listed: how many broken files the error names (the count is always given).

    Returns:
        the broken files (empty unless ``skip_broken``), which the data loader must leave out.

    Raises:
        FileNotFoundError: some images are missing (and none is otherwise broken).
        BrokenImageError: some images are empty, truncated or not images.
    """
    paths = [d["file_name"] for d in dataset_dicts]
    start = time.perf_counter()
    broken = find_broken_images(paths)
    logger.info(
        "Checked the %d images of %s in %.1f s: %d missing or broken.",
        len(set(paths)),
        list(names),
        time.perf_counter() - start,
        len(broken),
    )
    if not broken:
        return []
    total = len(set(paths))
    num_missing = sum(why == MISSING for why in broken.values())
    summary = (
        f"{len(broken)} of {total} images listed in the annotations of {list(names)} are "
        f"missing or broken ({num_missing} missing, {len(broken) - num_missing} broken)"
    )
    if training and skip_broken and len(broken) < total:
        shown = [f"{p!r} ({why})" for p, why in list(broken.items())[:_LISTED_WHEN_SKIPPED]]
        more = len(broken) - len(shown)
        logger.warning(
            "%s and are left out of training (DATALOADER.SKIP_BROKEN_IMAGES): %s%s",
            summary,
            "; ".join(shown),
            f"; and {more} more" if more else "",
        )
        return list(broken)
    if not training:
        what = (
            "An evaluation must see every image: replace the files or remove them from the "
            "annotations (DATALOADER.SKIP_BROKEN_IMAGES applies to training images only)."
        )
    elif skip_broken:
        what = "No image is usable."
    else:
        what = "Or set DATALOADER.SKIP_BROKEN_IMAGES True to train without them."
    shown = [f"{p!r} ({why})" for p, why in list(broken.items())[:listed]]
    error = FileNotFoundError if num_missing == len(broken) else BrokenImageError
    raise error(
        f"{summary}; the first {len(shown)}: {'; '.join(shown)}. Check the image root (the third "
        "item of DATASETS.COCO_FORMAT, or $DETECTRON2_DATASETS for builtin datasets) and that the "
        f"images were copied completely. {what}"
    )
