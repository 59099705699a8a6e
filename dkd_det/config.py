"""The configuration keys dkd-det adds to detectron2's."""

import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .checkpoint import add_checkpoint_config, merge_config_file
from .distill import add_distill_config, explain_unknown_key, load_plugins

__all__ = ["add_dkd_config", "distill_cfg", "get_dkd_cfg", "student_cfg", "uses_teacher"]


def add_dkd_config(cfg):
    """Add the distillation keys to a detectron2 config (in place).

    ``MODEL.DISTILL`` says how the student learns from the teacher: ``TERMS`` lists the
    distillation terms, any number of them, and each registered term has its node
    ``MODEL.DISTILL.<TERM>`` (:func:`dkd_det.distill.add_distill_config`; a term registered
    after this call has no keys in ``cfg``). ``MODEL.TEACHER`` says which frozen detector
    teaches.
    ``DATASETS.COCO_FORMAT`` registers users' own COCO-format datasets.
    ``DATALOADER.SKIP_BROKEN_IMAGES`` leaves missing or undecodable training images out (with
    a warning) instead of stopping before training.
    ``TEST.IMS_PER_BATCH`` batches the evaluation's images.
    ``MODEL.MOBILENET`` configures the MobileNetV2 backbone (``build_mobilenet_v2_fpn_backbone``).
    """
    _C = cfg

    add_distill_config(_C)

    _C.MODEL.TEACHER = CN()
    # The teacher's own detectron2 config: a model-zoo name such as
    # "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml" or a path to a yaml file; or a LazyConfig
    # .py file, e.g. the model-zoo "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py" (its
    # ``model`` is instantiated). A .py file is code: only detectron2's packaged model-zoo ones
    # are loaded unless DKD_DET_TRUST_FILES=1 (see dkd_det/checkpoint/safe_load.py).
    _C.MODEL.TEACHER.CONFIG_FILE = ""
    # The teacher's trained weights: a path, or a URL such as detectron2://...
    # Required: training against a random teacher is always an error. A LazyConfig teacher's
    # checkpoint is what detectron2's LazyConfig trainer saves ({"model": state_dict, ...}).
    _C.MODEL.TEACHER.WEIGHTS = ""
    # Overrides of the teacher's config. For a yaml config, KEY VALUE pairs merged into it:
    # e.g. ["MODEL.ROI_HEADS.NUM_CLASSES", "20"]. For a LazyConfig .py, "key=value" strings as
    # detectron2's LazyConfig.apply_overrides takes them: e.g. ["model.roi_heads.num_classes=20",
    # "model.input_format='RGB'"].
    _C.MODEL.TEACHER.OPTS = []
    # How a Cascade R-CNN teacher (CascadeROIHeads) scores the boxes of a student with one box
    # head: "mean", as detectron2's CascadeROIHeads scores at inference (every stage's box head
    # on the same boxes, their softmax probabilities averaged; handed to the logit terms as the
    # logits log(mean probability), whose softmax is that mean), or "stage0", "stage1", ...
    # (that stage's logits alone). A Faster R-CNN teacher has one stage ("mean" = "stage0").
    # A Cascade student (DistillCascadeROIHeads) is distilled stage by stage instead: at stage
    # k, a Cascade teacher's stage-k head (whatever this key says) or a Faster R-CNN teacher's
    # one head scores the student's stage-k boxes.
    _C.MODEL.TEACHER.CASCADE_SCORES = "mean"
    # How the teacher runs (what it computes is unchanged beyond precision; see README):
    # its forward passes under autocast to this dtype, "float32" (off), "bfloat16" or "float16",
    # whatever the student trains in; outputs are handed to the terms as float32.
    _C.MODEL.TEACHER.DTYPE = "float32"
    # Teacher weights and input images in channels_last memory format (faster convolutions on
    # GPUs with tensor cores).
    _C.MODEL.TEACHER.CHANNELS_LAST = False
    # torch.compile's backend for the teacher's backbone, with dynamic shapes ("" off;
    # "inductor" on a GPU). The first iterations pay the compile time.
    _C.MODEL.TEACHER.COMPILE = ""

    # Users' own COCO-format datasets, registered by name before training:
    # a list of (name, json_file, image_root) triples, e.g. in yaml
    #   COCO_FORMAT: [["my_train", "data/train.json", "data/images"]]
    # or on the command line
    #   DATASETS.COCO_FORMAT "[('my_train','data/train.json','data/images')]"
    _C.DATASETS.COCO_FORMAT = []

    # Before the first iteration every image of DATASETS.TRAIN and DATASETS.TEST is checked to
    # exist and decode (header and JPEG/PNG end marker, else a full decode), shared by ranks.
    # False: a missing or broken training image is an error that lists the files. True: such
    # training images are left out with a warning that names them, before training and when
    # one breaks during training. Test sets are never skipped (AP over fewer images would not
    # be comparable): a broken test image is always an error.
    _C.DATALOADER.SKIP_BROKEN_IMAGES = False

    # Images per inference batch of the evaluation (per process; detectron2's test loader
    # reads one at a time). A batch is padded to its largest image, as in training: images of
    # one size get the detections they get alone (to float precision), others move slightly.
    _C.TEST.IMS_PER_BATCH = 1

    # MobileNetV2 (dkd_det/modeling/backbone/mobilenet_v2.py), used when MODEL.BACKBONE.NAME
    # is "build_mobilenet_v2_fpn_backbone" or "build_mobilenet_v2_backbone".
    _C.MODEL.MOBILENET = CN()
    # Outputs, a subset of "m2", "m3", "m4", "m5" (strides 4, 8, 16, 32; 24, 32, 96 and 320
    # channels) and "last" (stride 32, 1280 channels: the final 1x1 conv of the classifier net).
    _C.MODEL.MOBILENET.OUT_FEATURES = ["m2", "m3", "m4", "m5"]
    # The norm of every conv: "FrozenBN" (fixed ImageNet statistics, as RESNETS.NORM),
    # "BN" (per-GPU batch statistics) or "SyncBN" (statistics across GPUs).
    _C.MODEL.MOBILENET.NORM = "FrozenBN"
    # The frozen stages are detectron2's MODEL.BACKBONE.FREEZE_AT, as for ResNet: stages
    # (no gradient, FrozenBN) from the input on, counted as stem, m2, m3, m4, m5.
    add_checkpoint_config(_C)


def get_dkd_cfg(config_file: str, opts=(), key: str = "--config-file") -> CN:
    """detectron2's defaults plus dkd-det's keys, ``config_file`` merged, then ``opts``
    (KEY VALUE pairs); not frozen. The one way dkd-det assembles a config, the teacher's
    included. The modules of ``DKD_DET_PLUGINS`` are imported first, so that the terms they
    register have their keys (:func:`dkd_det.distill.load_plugins`). A missing file is a
    FileNotFoundError that names it and ``key``, the option or config key it came from."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{key} {config_file!r}: no such file.")
    load_plugins()
    cfg = get_cfg()
    add_dkd_config(cfg)
    try:
        merge_config_file(cfg, config_file, key)
    except KeyError as e:
        raise KeyError(f"{key} {config_file!r}: {explain_unknown_key(e)}") from None
    try:
        cfg.merge_from_list(list(opts))
    except KeyError as e:
        raise KeyError(
            f"The overrides of {key} {config_file!r}: {explain_unknown_key(e)}"
        ) from None
    return cfg


def uses_teacher(cfg: CN) -> bool:
    """Whether ``cfg`` trains against a teacher: ``MODEL.DISTILL.TERMS`` lists a term."""
    distill = cfg.MODEL.get("DISTILL", None)
    return distill is not None and len(distill.TERMS) > 0


def distill_cfg(cfg: CN, terms) -> CN:
    """A copy of the student config ``cfg`` (a dkd-det config) that trains with the
    distillation ``terms`` (registered names, in order; empty: the plain student): the
    meta-architecture becomes ``DistillationRCNN`` and detectron2's ``StandardROIHeads``
    (``CascadeROIHeads``) its ``DistillROIHeads`` (``DistillCascadeROIHeads``) when a term reads
    the student's box logits. The teacher is whatever
    ``cfg.MODEL.TEACHER`` says. The counterpart of :func:`student_cfg`; not frozen."""
    from .distill import registered_terms

    out = cfg.clone()
    out.defrost()
    terms = [t.upper() for t in terms]
    out.MODEL.DISTILL.TERMS = terms
    if not terms:
        return out
    known = registered_terms()
    unknown = [t for t in terms if t not in known]
    if unknown:
        raise KeyError(
            f"Unknown distillation term(s) {unknown}; the registered terms are {sorted(known)} "
            "(DISTILL_TERM_REGISTRY; an out-of-tree term is imported through DKD_DET_PLUGINS)."
        )
    out.MODEL.META_ARCHITECTURE = "DistillationRCNN"
    reads_logits = any("student_logits" in known[t].reads for t in terms)
    keeping = {"StandardROIHeads": "DistillROIHeads", "CascadeROIHeads": "DistillCascadeROIHeads"}
    if reads_logits and out.MODEL.ROI_HEADS.NAME in keeping:
        out.MODEL.ROI_HEADS.NAME = keeping[out.MODEL.ROI_HEADS.NAME]
    return out


def student_cfg(cfg: CN) -> CN:
    """The student alone: a copy of ``cfg`` (dkd-det or plain detectron2) whose teacher and
    training-only modules are never built or loaded (``MODEL.DISTILL.TERMS`` empty), for
    evaluation, inference and export. The copy is frozen if ``cfg`` was. The one place that
    switches distillation off."""
    out = cfg.clone()
    frozen = out.is_frozen()
    out.defrost()
    if "DISTILL" in out.MODEL:
        out.MODEL.DISTILL.TERMS = []
    if frozen:
        out.freeze()
    return out
