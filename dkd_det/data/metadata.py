"""Class names of a dataset, for drawing and for exported students."""

import json
import logging
import os
from typing import List, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata

from .datasets import register_coco_format

__all__ = ["METADATA_FILE", "classes_from_coco_json", "dataset_metadata", "save_metadata"]

# Written next to an exported student's config.yaml: the class names of a COCO-format
# dataset, which a plain detectron2 config cannot hold.
METADATA_FILE = "metadata.json"

logger = logging.getLogger(__name__)


def classes_from_coco_json(json_file: str) -> List[str]:
    """Category names of a COCO json, ordered by category id (as detectron2's loader orders
    them)."""
    with open(json_file) as f:
        cats = json.load(f)["categories"]
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def dataset_metadata(cfg: CfgNode, config_file: Optional[str] = None) -> Metadata:
    """The metadata (class names) of ``cfg.DATASETS.TEST[0]``.

    Builtin datasets (COCO) know their classes; a COCO-format dataset of ``DATASETS.COCO_FORMAT``
    is registered and its classes read from its json; otherwise the ``metadata.json`` an export
    wrote next to ``config_file`` is used. Without any of them the class ids are drawn instead.
    """
    register_coco_format(cfg)
    name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None:
        json_file = meta.get("json_file", None)
        if json_file and os.path.isfile(json_file):
            meta.thing_classes = classes_from_coco_json(json_file)
    if meta.get("thing_classes") is None and config_file:
        sidecar = os.path.join(os.path.dirname(os.path.abspath(config_file)), METADATA_FILE)
        if os.path.isfile(sidecar):
            with open(sidecar) as f:
                return Metadata(name=name, **json.load(f))
    if meta.get("thing_classes") is None:
        logger.warning("The class names of dataset %r are unknown: drawing class ids.", name)
    return meta


def save_metadata(folder: str, thing_classes: Sequence[str]) -> str:
    """Write ``folder/metadata.json`` (``{"thing_classes": [...]}``), which
    :func:`dataset_metadata` reads for a config in ``folder``; returns its path."""
    path = os.path.join(folder, METADATA_FILE)
    with open(path, "w") as f:
        json.dump({"thing_classes": list(thing_classes)}, f)
    return path
