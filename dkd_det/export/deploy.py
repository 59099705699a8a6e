"""Deployable students: TorchScript (traced or scripted) and ONNX files made with
``detectron2.export``, the JSON a user needs to feed them, and the check that they give the
PyTorch student's detections.

Every exported model follows detectron2's own deployment recipe (its
``tools/deploy/export_model.py``): it takes one float32 ``(3, H, W)`` image in
``cfg.INPUT.FORMAT`` channel order, values 0-255, *already resized* the way
``DefaultPredictor`` resizes (detectron2's ``ResizeShortestEdge``: shortest side
``INPUT.MIN_SIZE_TEST``, longest at most ``INPUT.MAX_SIZE_TEST``, PIL's bilinear resize of the
uint8 image, which antialiases when shrinking); normalisation and padding happen inside. It
returns the boxes (XYXY, in the resized image's pixels), scores and classes, without
detectron2's final rescaling to the original size (``model.inference(..., do_postprocess=False)``).
A Mask R-CNN's export also returns ``pred_masks``: (N, 1, M, M) mask probabilities inside each
box (M = 28 for detectron2's mask head), not yet pasted into the image; the check pastes them as
detectron2 does and compares them by mask IoU.
"""

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.structures import Boxes
from PIL import Image

__all__ = [
    "PREPROCESSING_KEYS",
    "SHRINK",
    "ConfigMismatchError",
    "ExportError",
    "check_training_config",
    "preprocessing_config",
    "DEPLOY_FILE",
    "DEPLOY_FORMATS",
    "DEPLOY_EXTRA_HINT",
    "ONNX_EXPORTER",
    "ONNX_OPSET",
    "DeployCheckError",
    "DeployedModel",
    "Detections",
    "MissingDeployExtra",
    "Tolerances",
    "check_deployed",
    "compare_detections",
    "export_deployable",
    "export_onnx",
    "export_torchscript",
    "mask_ious",
    "pytorch_detections",
    "require_onnx",
    "resize_for_model",
    "sample_inputs",
]

logger = logging.getLogger(__name__)

# Written beside model.ts / model.onnx: what a user needs to feed the file and read its output.
DEPLOY_FILE = "deploy.json"
DEPLOY_FORMATS = ("torchscript", "onnx")
_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
# detectron2 pools with ROIAlignV2 (aligned=True: pixel centres at +0.5). ONNX's RoiAlign has
# no such mode before opset 16 (coordinate_transformation_mode="half_pixel" is new in 16), so
# torchvision exports it at opset 11 as aligned=False with a warning: every pooled region is
# off by half a feature-map pixel and the boxes differ by tens of pixels. Opset 16 is exact,
# and so is 17, the default: the newest opset that the TorchScript-based exporter writes
# correctly on every supported torch (torch 2.3's writes ReduceMax with an ``axes`` attribute
# at opset 18, which the ONNX checker refuses; current torch's goes up to 20).
ONNX_OPSET = 17
# torch.onnx.export's exporter: the TorchScript-based one ("legacy", ``dynamo=False``), chosen
# explicitly because torch >= 2.9 defaults to the dynamo one (torch.export), which cannot
# capture a detectron2 R-CNN: its data-dependent branches (the first at detectron2's
# proposal_utils.py, ``if not valid_mask.all():`` in find_top_rpn_proposals) stop torch.export.
ONNX_EXPORTER = "legacy"
DEPLOY_EXTRA_HINT = (
    "pip install 'dkd_det[deploy]' (`make setup` installs it into .venv with the stack's pins, "
    "requirements/)"
)


class MissingDeployExtra(ImportError):
    """onnx or onnxruntime is not installed (they are the optional ``deploy`` extra)."""


class DeployCheckError(ValueError):
    """The exported model does not reproduce the PyTorch student's detections, or the check saw
    no detection at all (which checks nothing)."""


class ExportError(RuntimeError):
    """``torch.jit.trace``/``script`` or ``torch.onnx.export`` failed; the message is one line
    naming the format and the cause (the original exception is chained)."""


class ConfigMismatchError(ValueError):
    """The export's preprocessing config differs from the training config saved beside the
    checkpoint."""


# The config values that decide how an image must be prepared for the model: written to
# deploy.json and compared with the training config.
PREPROCESSING_KEYS = (
    "INPUT.FORMAT",
    "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "INPUT.MIN_SIZE_TEST",
    "INPUT.MAX_SIZE_TEST",
)
# The check also runs on an image that the resize shrinks by this factor, where PIL's
# antialiasing (detectron2's resize) and a plain bilinear resize (cv2.INTER_LINEAR) differ most.
SHRINK = 0.3


def _get(cfg: CfgNode, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return list(node) if isinstance(node, (list, tuple)) else node


def preprocessing_config(cfg: CfgNode) -> Dict:
    """{key: value} of :data:`PREPROCESSING_KEYS` in ``cfg`` (lists for mean and std)."""
    return {key: _get(cfg, key) for key in PREPROCESSING_KEYS}


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)))
    return a == b


def check_training_config(cfg: CfgNode, weights: str) -> Optional[str]:
    """Compare ``cfg``'s preprocessing (:data:`PREPROCESSING_KEYS`) with the training config
    that detectron2 saved beside the checkpoint (``config.yaml`` in the folder of ``weights``,
    written by ``default_setup``).

    Returns:
        the path of the training config compared, or None when there is none (a checkpoint
        outside its training folder, a URL) or it cannot be read as a config (logged).

    Raises:
        ConfigMismatchError: some value differs; the message names each key, both values, both
            files and the flag that exports anyway.
    """
    from ..config import get_dkd_cfg  # export -> config, only when comparing

    if "://" in weights:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), "config.yaml")
    if not os.path.isfile(path):
        logger.info("No training config beside %s: the preprocessing is not compared.", weights)
        return None
    try:
        trained = get_dkd_cfg(path, key=f"the training config beside {weights!r}")
    except (KeyError, ValueError, AssertionError) as e:
        logger.warning(
            "%s cannot be read as a dkd-det config (%s: %s): the preprocessing is not compared.",
            path,
            type(e).__name__,
            e,
        )
        return None
    ours, theirs = preprocessing_config(cfg), preprocessing_config(trained)
    diff = [
        f"{k}: {ours[k]!r} here, {theirs[k]!r} in training"
        for k in ours
        if not _same(ours[k], theirs[k])
    ]
    if diff:
        raise ConfigMismatchError(
            f"The export's preprocessing differs from the training config {path} (saved beside "
            f"the checkpoint {weights}): {'; '.join(diff)}. The exported model and deploy.json "
            "would prepare images differently from how the model was trained and evaluated. "
            f"Export with --config-file {path} (or the same overrides as in training), or pass "
            "--ignore-training-config if the change is deliberate."
        )
    return path


def require_onnx():
    """``(onnx, onnxruntime)``, imported; raises :class:`MissingDeployExtra` naming what to
    install when either is missing."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise MissingDeployExtra(
            f"--format onnx needs onnx and onnxruntime ({e}); install them with "
            f"{DEPLOY_EXTRA_HINT}."
        ) from e
    return onnx, onnxruntime


class Detections(NamedTuple):
    """One image's detections: boxes (N, 4) XYXY in the model input's pixels, scores (N,)
    in [0, 1], classes (N,) int64 contiguous class ids, and for a Mask R-CNN masks
    (N, 1, M, M) float mask probabilities inside each box, as the mask head predicts them
    before pasting (None without a mask head); CPU tensors."""

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    masks: Optional[torch.Tensor] = None


@dataclass
class Tolerances:
    """How close an exported model's detection must be to the PyTorch student's.

    box_px: largest difference of any box coordinate, in model-input pixels.
    score: largest difference of the score (probability).
    mask_iou: smallest IoU of a matched pair's masks (Mask R-CNN), each pasted into the model
    input's image by its own box as detectron2 pastes them (``paste_masks_in_image``, mask
    probability > 0.5).
    Classes must be equal. A detection that only one side has is tolerated when its score is
    within ``score`` of where the other side's output was cut (``SCORE_THRESH_TEST``, or the
    lowest kept score when ``DETECTIONS_PER_IMAGE`` detections were kept): there a score
    difference within tolerance legitimately decides whether it is kept.
    """

    box_px: float = 0.05
    score: float = 1e-3
    mask_iou: float = 0.99


def resize_for_model(cfg: CfgNode, image: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 image in ``cfg.INPUT.FORMAT`` -> the exported model's input: float32
    (3, H', W'), resized as :class:`DefaultPredictor` does (detectron2's ResizeShortestEdge to
    ``INPUT.MIN_SIZE_TEST``, at most ``INPUT.MAX_SIZE_TEST``: PIL bilinear on the uint8 image,
    antialiased when shrinking). The README's recipe (PIL only) gives the same tensor."""
    aug = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    resized = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))


def _enlarged(cfg: CfgNode, image: np.ndarray, shrink: float) -> np.ndarray:
    # An enlargement of ``image`` that the resize brings back down by ``shrink``.
    h, w = resize_for_model(cfg, image).shape[1:]
    size = (int(round(w / shrink)), int(round(h / shrink)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def sample_inputs(
    cfg: CfgNode,
    files: Sequence[str] = (),
    num_random: int = 0,
    seed: int = 0,
    shrink: Optional[float] = SHRINK,
) -> List[Tuple[str, torch.Tensor]]:
    """(name, model input) pairs for tracing and checking an export: the image ``files`` (read
    as detectron2 reads images, with PIL in ``cfg.INPUT.FORMAT``, EXIF orientation applied),
    ``num_random`` random images, always one random image whose aspect ratio is the transpose
    of the first one's, so that a traced model that kept the tracing input's shape fails the
    check, and (``shrink``) the first image enlarged so that the resize shrinks it by ``shrink``
    (0.3), the regime where resizing as detectron2 does matters most.

    Raises:
        OSError: a file cannot be read as an image.
    """
    out, originals = [], []
    for path in files:
        try:
            image = read_image(path, format=cfg.INPUT.FORMAT)
        except Exception as e:  # missing, truncated, not an image
            raise OSError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from e
        image = np.ascontiguousarray(image)
        originals.append((path, image))
        out.append((path, resize_for_model(cfg, image)))
    rng = np.random.default_rng(seed)
    shapes = [(480, 640)] * num_random
    first = out[0][1].shape[1:] if out else (shapes or [(480, 640)])[0]
    shapes.append((int(first[1]), int(first[0]) + 32))  # + 32: a square image still changes
    for k, (h, w) in enumerate(shapes):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        originals.append((f"random image {k}", image))
        out.append((f"random image {k} ({h}x{w})", resize_for_model(cfg, image)))
    if shrink:
        name, image = originals[0]
        big = _enlarged(cfg, image, shrink)
        out.append(
            (
                f"{name} enlarged to {big.shape[0]}x{big.shape[1]}, shrunk {shrink}x by the resize",
                resize_for_model(cfg, big),
            )
        )
    return out


def _to_detections(boxes, scores, classes, masks=None) -> Detections:
    if masks is not None:
        masks = torch.as_tensor(masks).detach().float().cpu()
        masks = masks.reshape(len(masks), 1, *masks.shape[-2:])
    return Detections(
        torch.as_tensor(boxes).detach().float().cpu().reshape(-1, 4),
        torch.as_tensor(scores).detach().float().cpu(),
        torch.as_tensor(classes).detach().long().cpu(),
        masks,
    )


def _has_masks(model: torch.nn.Module) -> bool:
    """Whether the student predicts masks (a Mask R-CNN: ``MODEL.MASK_ON``)."""
    return bool(getattr(model.roi_heads, "mask_on", False))


@torch.no_grad()
def pytorch_detections(model: torch.nn.Module, image: torch.Tensor) -> Detections:
    """The student's own detections for one (3, H, W) model input, without the final rescaling
    (and a Mask R-CNN's masks not pasted), as the exported models compute them."""
    inst = model.inference([{"image": image.to(model.device)}], do_postprocess=False)[0]
    masks = inst.pred_masks if inst.has("pred_masks") else None
    return _to_detections(inst.pred_boxes.tensor, inst.scores, inst.pred_classes, masks)


def _inference(model, inputs):
    # detectron2's recipe: no postprocessing, so the graph needs no original-size inputs.
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def _tracing_adapter(model: torch.nn.Module, sample: torch.Tensor):
    """detectron2's TracingAdapter around the student and the names of its flat outputs
    (the Instances fields in the order TracingAdapter flattens them, then ``image_size``)."""
    # eval() on the adapter too: torch.onnx.export restores the wrapper's mode afterwards,
    # and a fresh Module is in training mode, which would put the student in it.
    adapter = TracingAdapter(model.eval(), [{"image": sample}], _inference).eval()
    adapter(sample)  # records the outputs' schema
    instances_schema = adapter.outputs_schema.schemas[0].schemas[0]
    return adapter, list(instances_schema.keys) + ["image_size"]


class _ScriptableStudent(torch.nn.Module):
    """What ``torch.jit.script`` compiles: dicts out, not Instances (pytorch#46944), as in
    detectron2's export_model.py."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, inputs: Tuple[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
        return [i.get_fields() for i in self.model.inference(inputs, do_postprocess=False)]


def export_torchscript(
    model: torch.nn.Module, sample: torch.Tensor, path: str, method: str = "trace"
) -> Dict:
    """Write the student as TorchScript to ``path``.

    Args:
        model: the student (``GeneralizedRCNN``), in eval mode.
        sample: a (3, H, W) model input to trace with (``method="trace"``).
        method: "trace" (``TracingAdapter`` + ``torch.jit.trace``: input one image tensor,
            output the tuple ``outputs``) or "script" (``scripting_with_instances``: input a
            tuple of ``{"image": tensor}``, output a list of dicts of the same names).

    torch.jit (trace, script, save, load) is deprecated in current torch (a FutureWarning,
    not silenced here); it still works, and it is kept while torch ships it.

    Returns:
        {"method", "outputs": names of the outputs, in order}.
    """
    if method == "trace":
        adapter, names = _tracing_adapter(model, sample)
        # check_trace re-runs and compares with a second trace, which the data-dependent
        # number of detections makes noisy; the real check is check_deployed's.
        exported = torch.jit.trace(adapter, (sample,), check_trace=False)
    elif method == "script":
        fields = {
            "proposal_boxes": Boxes,
            "objectness_logits": torch.Tensor,
            "pred_boxes": Boxes,
            "scores": torch.Tensor,
            "pred_classes": torch.Tensor,
            "pred_masks": torch.Tensor,  # a Mask R-CNN's; never set for Faster R-CNN
        }
        exported = scripting_with_instances(_ScriptableStudent(model), fields)
        names = ["pred_boxes", "pred_classes", "scores"] + ["pred_masks"] * _has_masks(model)
    else:
        raise ValueError(f"Unknown TorchScript method {method!r}: use 'trace' or 'script'.")
    torch.jit.save(exported, path)
    return {"method": method, "outputs": names}


def export_onnx(
    model: torch.nn.Module, sample: torch.Tensor, path: str, opset: int = ONNX_OPSET
) -> Dict:
    """Write the student as ONNX (traced through ``TracingAdapter`` by torch's
    TorchScript-based exporter, ``dynamo=False``: see ``ONNX_EXPORTER``) to ``path``: input
    ``image`` (3, height, width) with dynamic height and width, outputs as in
    :func:`export_torchscript`'s trace.

    Raises:
        ValueError: ``opset`` cannot express the model's ROIAlignV2 (see ``ONNX_OPSET``).
        MissingDeployExtra: onnx is not installed.
    """
    require_onnx()
    pooler = model.roi_heads.box_pooler.level_poolers[0]
    if opset < 16 and getattr(pooler, "aligned", False):
        raise ValueError(
            f"ONNX opset {opset} cannot express detectron2's ROIAlignV2 (aligned=True): RoiAlign "
            "has coordinate_transformation_mode='half_pixel' only from opset 16, and "
            "torchvision exports it as aligned=False below that, which moves every pooled box "
            "by half a pixel. Use --opset 16 or higher."
        )
    adapter, names = _tracing_adapter(model, sample)
    axes = {"image": {1: "height", 2: "width"}}
    axes.update({name: {0: "detections"} for name in names if name != "image_size"})
    torch.onnx.export(
        adapter,
        (sample,),
        path,
        opset_version=opset,
        input_names=["image"],
        output_names=names,
        dynamic_axes=axes,
        **_legacy_exporter(),
    )
    return {"opset": opset, "exporter": ONNX_EXPORTER, "outputs": names}


def _legacy_exporter() -> Dict:
    """torch.onnx.export's argument that selects the TorchScript-based exporter (see
    ``ONNX_EXPORTER``): ``dynamo=False`` where torch has the choice (the default from 2.9
    is dynamo), nothing on older torch, whose only exporter it is."""
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        return {"dynamo": False}
    return {}


class DeployedModel:
    """An exported student, loaded from its folder (``model.ts`` or ``model.onnx`` and
    ``deploy.json``) and called like the PyTorch one: one (3, H, W) model input ->
    :class:`Detections`. Needs torch and torchvision (their ops are in the graph), and for
    ONNX onnxruntime; never dkd-det's or detectron2's model code."""

    def __init__(
        self,
        folder: str,
        device: str = "cpu",
        num_threads: Optional[int] = None,
        info: Optional[Dict] = None,
    ):
        """
        Args:
            info: deploy.json's content, when it is not (yet) in ``folder``.
        """
        if info is None:
            with open(os.path.join(folder, DEPLOY_FILE)) as f:
                info = json.load(f)
        self.info = info
        self.format = self.info["format"]
        self.path = os.path.join(folder, self.info["file"])
        self.device = torch.device(device)
        if self.format == "torchscript":
            import torchvision  # noqa: F401  registers the nms / roi_align ops the graph calls

            self.model = torch.jit.load(self.path, map_location=self.device)
        elif self.format == "onnx":
            _, ort = require_onnx()
            options = ort.SessionOptions()
            # The same thread count as torch, so that latencies compare.
            options.intra_op_num_threads = num_threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda":
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise ValueError(
                        "This onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu."
                    )
                providers.insert(0, "CUDAExecutionProvider")
            self.model = ort.InferenceSession(self.path, options, providers=providers)
        else:
            raise ValueError(f"{self.path}: unknown format {self.format!r}")

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> Detections:
        names = self.info["outputs"]
        if self.format == "onnx":
            values = self.model.run(names, {"image": image.cpu().numpy()})
            out = dict(zip(names, values))
        elif self.info["method"] == "script":
            out = self.model(({"image": image.to(self.device)},))[0]
        else:
            out = dict(zip(names, self.model(image.to(self.device))))
        masks = out.get("pred_masks", None)
        return _to_detections(out["pred_boxes"], out["scores"], out["pred_classes"], masks)


def mask_ious(
    ref: Detections, got: Detections, pairs: Sequence[Tuple[int, int]], image_size: Tuple[int, int]
) -> torch.Tensor:
    """IoU of the masks of each ``(i, j)`` pair (``ref``'s i-th, ``got``'s j-th detection), each
    pasted into an image of ``image_size`` (H, W) by its own box as detectron2 pastes them
    (:func:`paste_masks_in_image`, probability > 0.5). Two empty masks agree (IoU 1).

    Returns:
        (len(pairs),) float IoUs.
    """
    if not pairs:
        return torch.zeros(0)
    i, j = (torch.tensor(k, dtype=torch.long) for k in zip(*pairs))
    a = paste_masks_in_image(ref.masks[i, 0], Boxes(ref.boxes[i]), image_size, threshold=0.5)
    b = paste_masks_in_image(got.masks[j, 0], Boxes(got.boxes[j]), image_size, threshold=0.5)
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def compare_detections(
    ref: Detections,
    got: Detections,
    tol: Tolerances,
    score_thresh: float,
    max_dets: int,
    image_size: Optional[Tuple[int, int]] = None,
) -> Tuple[Dict[str, float], List[str]]:
    """Match ``got`` to ``ref`` one to one (same class, every box coordinate within
    ``tol.box_px``, score within ``tol.score``; highest reference scores first). When ``ref``
    has masks, the masks of every matched pair must have an IoU of at least ``tol.mask_iou``
    (:func:`mask_ious`, pasted into an image of ``image_size`` (H, W), by default one that holds
    every box).

    Returns:
        stats {"matched", "borderline" (unmatched but tolerated, see :class:`Tolerances`),
        "max_box_px", "max_score", and with masks "min_mask_iou"} over the matched pairs, and
        the problems (one line per detection without a counterpart or whose mask differs;
        empty when the outputs agree).
    """
    cutoff = score_thresh
    for d in (ref, got):
        if len(d) and len(d.scores) >= max_dets:
            cutoff = max(cutoff, float(d.scores.min()))
    used = torch.zeros(len(got.scores), dtype=torch.bool)
    stats = {"matched": 0, "borderline": 0, "max_box_px": 0.0, "max_score": 0.0}
    problems, pairs = [], []
    for i in torch.argsort(ref.scores, descending=True).tolist():
        box_diff = (got.boxes - ref.boxes[i]).abs().amax(dim=1)
        score_diff = (got.scores - ref.scores[i]).abs()
        ok = (
            ~used
            & (got.classes == ref.classes[i])
            & (box_diff <= tol.box_px)
            & (score_diff <= tol.score)
        )
        if ok.any():
            j = int(torch.where(ok, box_diff, torch.full_like(box_diff, float("inf"))).argmin())
            used[j] = True
            pairs.append((i, j))
            stats["matched"] += 1
            stats["max_box_px"] = max(stats["max_box_px"], float(box_diff[j]))
            stats["max_score"] = max(stats["max_score"], float(score_diff[j]))
        elif float(ref.scores[i]) <= cutoff + tol.score:
            stats["borderline"] += 1
        else:
            near = ""
            if len(got.scores):
                j = int(box_diff.argmin())
                near = (
                    f"; nearest exported: class {int(got.classes[j])}, score "
                    f"{float(got.scores[j]):.4f}, box {_fmt_box(got.boxes[j])}"
                )
            problems.append(
                f"PyTorch's class {int(ref.classes[i])}, score {float(ref.scores[i]):.4f}, box "
                f"{_fmt_box(ref.boxes[i])} has no exported counterpart{near}"
            )
    for j in torch.nonzero(~used).flatten().tolist():
        if float(got.scores[j]) <= cutoff + tol.score:
            stats["borderline"] += 1
        else:
            problems.append(
                f"exported class {int(got.classes[j])}, score {float(got.scores[j]):.4f}, box "
                f"{_fmt_box(got.boxes[j])} is not in PyTorch's output"
            )
    if ref.masks is not None:
        if got.masks is None:
            return stats, problems + ["the PyTorch student predicts masks, the export none"]
        if image_size is None:
            corners = torch.cat([ref.boxes, got.boxes]).amax(dim=0) if pairs else torch.zeros(4)
            image_size = (int(corners[3].ceil()) + 1, int(corners[2].ceil()) + 1)
        ious = mask_ious(ref, got, pairs, image_size)
        stats["min_mask_iou"] = float(ious.min()) if len(ious) else 1.0
        for (i, _), iou in zip(pairs, ious.tolist()):
            if iou < tol.mask_iou:
                problems.append(
                    f"PyTorch's class {int(ref.classes[i])}, score {float(ref.scores[i]):.4f}, box "
                    f"{_fmt_box(ref.boxes[i])}: mask IoU {iou:.4f} with its exported counterpart"
                )
    return stats, problems


def _fmt_box(box: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box.tolist()) + "]"


def check_deployed(
    cfg: CfgNode,
    model: torch.nn.Module,
    deployed: DeployedModel,
    images: Sequence[Tuple[str, torch.Tensor]],
    tol: Tolerances = Tolerances(),
) -> Dict[str, float]:
    """Run the PyTorch student and the exported model on ``images`` ((name, model input)
    pairs) and compare their detections with :func:`compare_detections`.

    Returns:
        totals over the images: {"images", "detections" (PyTorch's), "matched",
        "borderline", "max_box_px", "max_score", and for a Mask R-CNN "min_mask_iou"}.

    Raises:
        DeployCheckError: some detection has no counterpart; the message names the image, the
            detections and the tolerances.
    """
    total = {"images": 0, "detections": 0, "matched": 0, "borderline": 0}
    total.update(max_box_px=0.0, max_score=0.0)
    masks = _has_masks(model)
    if masks:
        total["min_mask_iou"] = 1.0
    for name, image in images:
        ref, got = pytorch_detections(model, image), deployed(image)
        stats, problems = compare_detections(
            ref,
            got,
            tol,
            cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            cfg.TEST.DETECTIONS_PER_IMAGE,
            image_size=tuple(image.shape[1:]),
        )
        if problems:
            shown = "\n  ".join(problems[:5])
            more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
            mask_tol = f", mask IoU {tol.mask_iou}" if masks else ""
            raise DeployCheckError(
                f"The {deployed.format} export does not reproduce the PyTorch student on "
                f"{name} ({tuple(image.shape[1:])} input): {len(problems)} of "
                f"{len(ref.scores)} PyTorch / {len(got.scores)} exported detections differ "
                f"beyond the tolerances (box {tol.box_px} px, score {tol.score}{mask_tol}, same "
                f"class):\n  {shown}{more}"
            )
        if masks:
            total["min_mask_iou"] = min(total["min_mask_iou"], stats["min_mask_iou"])
        total["images"] += 1
        total["detections"] += len(ref.scores)
        for key in ("matched", "borderline"):
            total[key] += stats[key]
        for key in ("max_box_px", "max_score"):
            total[key] = max(total[key], stats[key])
    return total


def _deploy_info(
    cfg: CfgNode,
    model: torch.nn.Module,
    fmt: str,
    classes: Optional[Sequence[str]],
    extra: Dict,
    training_config: Optional[str],
) -> Dict:
    return {
        "format": fmt,
        "file": _FILES[fmt],
        **extra,
        "input": {
            "name": "image",
            "dtype": "float32",
            "shape": ["3", "height", "width"],
            "channel_order": cfg.INPUT.FORMAT,
            "value_range": [0, 255],
            "resize": {
                "min_size": cfg.INPUT.MIN_SIZE_TEST,
                "max_size": cfg.INPUT.MAX_SIZE_TEST,
                "interpolation": "PIL.Image.BILINEAR on the uint8 image",
                "how": "detectron2's ResizeShortestEdge, as DefaultPredictor: scale = min_size / "
                "shortest side, then if the longest side would exceed max_size scale both down to "
                "it; height and width rounded with int(x + 0.5); resized with PIL's "
                "Image.resize(size, Image.BILINEAR), which antialiases when shrinking "
                "(cv2.INTER_LINEAR does not, and gives other detections); see the README's recipe",
            },
            # Applied inside the model: informative, never to be applied by the caller.
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "normalized_inside_model": True,
            "size_divisibility": model.backbone.size_divisibility,
        },
        # The config values that decide the preprocessing, as exported.
        "config": preprocessing_config(cfg),
        # The training config they were compared with (None: not compared).
        "training_config": training_config,
        "output_boxes": "XYXY in the resized input's pixels; multiply x by original_width / "
        "width and y by original_height / height for the original image",
        **(
            {
                "output_masks": "pred_masks: (detections, 1, M, M) float mask probabilities "
                "inside each box (M = 28), not pasted: resize each to its box (bilinear, as "
                "detectron2's paste_masks_in_image) and keep the pixels above 0.5"
            }
            if _has_masks(model)
            else {}
        ),
        "score_threshold": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
        "nms_threshold": cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
        "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        "thing_classes": list(classes) if classes is not None else None,
        "torch": torch.__version__,
    }


def _one_line(what: str, e: BaseException) -> str:
    """``what`` failed: the exception's first line, and the first source location it names."""
    text = str(e).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.rstrip(":").strip() or type(e).__name__
    where = re.search(r'File "([^"]+)", line (\d+)', text)
    at = f" (at {where.group(1)}, line {where.group(2)})" if where else ""
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{what} failed: {type(e).__name__}: {first}{at}"


@contextlib.contextmanager
def _one_line_errors(what: str):
    """Any error but ours becomes an :class:`ExportError` of one line (the whole message goes to
    the log): torch.jit, torch.onnx and onnxruntime errors run to pages of graph and source."""
    try:
        yield
    except (MissingDeployExtra, DeployCheckError, ExportError):
        raise
    except Exception as e:
        if isinstance(e, ValueError) and "\n" not in str(e).strip():
            raise  # ours (e.g. the opset's refusal): already one clear line
        logger.info("%s failed:\n%s", what, e)
        raise ExportError(_one_line(what, e)) from e


def export_deployable(
    cfg: CfgNode,
    model: torch.nn.Module,
    output_dir: str,
    fmt: str,
    images: Sequence[Tuple[str, torch.Tensor]],
    classes: Optional[Sequence[str]] = None,
    method: str = "trace",
    opset: int = ONNX_OPSET,
    check: bool = True,
    tol: Tolerances = Tolerances(),
    real_images: int = 0,
    require_detections: bool = False,
    training_config: Optional[str] = None,
) -> Dict:
    """Export the student to ``output_dir/model.ts`` or ``model.onnx`` plus
    ``output_dir/deploy.json`` (input format, the resize, pixel mean/std, the preprocessing
    config values, output names, class names, the check's result), then check it on ``images``.

    The files are written to a temporary folder inside ``output_dir`` and moved into place
    only when the check passed: a failed export never replaces a previous one.

    Args:
        cfg: the student's config (see :func:`dkd_det.config.student_cfg`).
        fmt: "torchscript" or "onnx".
        images: (name, (3, H, W) model input) pairs; the first is the tracing input.
        method: TorchScript's "trace" or "script".
        real_images: how many of ``images`` come from real image files (the others are random
            noise); 0 is recorded in deploy.json as a check on no real image.
        require_detections: fail when the PyTorch student detected nothing in ``images`` (a
            check that checks nothing; tools/export_student.py sets it unless
            ``--allow-no-detections``). Without it such a check is recorded in deploy.json with
            a warning.
        training_config: the training config the preprocessing was compared with
            (:func:`check_training_config`), recorded in deploy.json.

    Returns:
        {"model": path, "info": path of deploy.json, "check": :func:`check_deployed`'s totals
        plus "real_images" (None without check)}.

    Raises:
        DeployCheckError: the check failed, or saw no detection (with ``require_detections``);
            nothing is written.
        ExportError: the exporter failed (one line: format and cause); nothing is written.
        MissingDeployExtra: ONNX without onnx/onnxruntime.
    """
    if fmt not in DEPLOY_FORMATS:
        raise ValueError(f"Unknown format {fmt!r}: one of {DEPLOY_FORMATS}.")
    if fmt == "onnx":
        require_onnx()
    os.makedirs(output_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".export-", dir=output_dir)
    try:
        written = {
            "model": os.path.join(work, _FILES[fmt]),
            "info": os.path.join(work, DEPLOY_FILE),
        }
        sample = images[0][1].to(model.device)
        what = f"TorchScript ({method})" if fmt == "torchscript" else f"ONNX (opset {opset})"
        with _one_line_errors(f"{what} export"):
            if fmt == "torchscript":
                extra = export_torchscript(model, sample, written["model"], method)
            else:
                extra = export_onnx(model, sample, written["model"], opset)
        info = _deploy_info(cfg, model, fmt, classes, extra, training_config)
        info["check"], totals = None, None
        if check:
            with _one_line_errors(f"Running the {what} export for its check"):
                deployed = DeployedModel(work, device=str(model.device), info=info)
                totals = check_deployed(cfg, model, deployed, images, tol)
            totals["real_images"] = real_images
            if totals["detections"] == 0 and require_detections:
                raise DeployCheckError(
                    f"The {fmt} export was checked on {totals['images']} images "
                    f"({', '.join(name for name, _ in images)}) and the PyTorch student detected "
                    "nothing in any of them (score threshold "
                    f"{cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST}): that checks nothing. Check on "
                    "images the model detects objects in (--check-images), or pass "
                    "--allow-no-detections to export anyway."
                )
            tolerances = asdict(tol)
            if not _has_masks(model):
                tolerances.pop("mask_iou")
            info["check"] = {
                **totals,
                "inputs": [name for name, _ in images],
                "tolerances": tolerances,
            }
            warnings = []
            if real_images == 0:
                warnings.append(
                    "checked on no real image (random noise only): it says little about the "
                    "detections on real images"
                )
            if totals["detections"] == 0:
                warnings.append("the PyTorch student detected nothing: nothing was compared")
            if warnings:
                info["check"]["warning"] = "; ".join(warnings)
        with open(written["info"], "w") as f:
            json.dump(info, f, indent=2)
        result = {key: os.path.join(output_dir, os.path.basename(p)) for key, p in written.items()}
        for key in ("model", "info"):
            os.replace(written[key], result[key])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**result, "check": totals}
