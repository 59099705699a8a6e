"""torchvision ImageNet backbones -> detectron2's backbone weights (.pkl).

The output follows detectron2's convention for third-party ImageNet weights
(``{"model": {name: np.ndarray}, "__author__": "torchvision", "matching_heuristics": True}``,
names as in detectron2's ``ResNet``): ``DetectionCheckpointer`` matches the names by suffix,
so one file loads into a bare ``build_resnet_backbone`` (``res2.0.conv1.weight``) and into a
full Faster R-CNN FPN (``backbone.bottom_up.res2.0.conv1.weight``).

Each architecture is one entry of :data:`CONVERTERS`: its weights enum and a function that
renames its state dict to the names of the detectron2 backbone that will consume it
(ResNet-18/34/50/101 -> detectron2's ``ResNet``; MobileNetV2 -> ``dkd_det.modeling.MobileNetV2``).
"""

import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision

from .safe_load import (
    NAME_HASH_RULE,
    HashMismatchError,
    check_fetchable,
    file_sha256,
    load_torch_file,
    name_hash_prefix,
)

__all__ = [
    "Converter",
    "CONVERTERS",
    "load_torchvision_state_dict",
    "convert_torchvision",
    "save_d2_pkl",
    "missing_weights_hint",
]


@dataclass(frozen=True)
class Converter:
    """How to get and rename one torchvision architecture's ImageNet weights.

    Attributes:
        builder: name of the torchvision.models constructor (``"resnet18"``), used to check that
            a state dict really is this architecture.
        weights: the torchvision weights enum member, as ``"ResNet18_Weights.IMAGENET1K_V1"``.
        rename: torchvision state-dict key -> detectron2 key, or None to drop the key.
        d2_config: the detectron2 config keys the converted weights need (documentation, printed).
        file_name: where the configs of configs/COCO expect the converted file (basename),
            e.g. ``"R-18-torchvision.pkl"``; named in the error when it is missing.
        title: the architecture's name for people, e.g. ``"ResNet-18"``.
    """

    builder: str
    weights: str
    rename: Callable[[str], Optional[str]]
    d2_config: str
    file_name: str = ""
    title: str = ""


def _rename_resnet(key: str) -> Optional[str]:
    """torchvision ResNet key -> detectron2 ``ResNet`` key (``layer1.0.bn2.weight`` ->
    ``res2.0.conv2.norm.weight``); None for the ImageNet classifier and BN batch counters."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    m = re.match(r"layer(\d)\.(.*)", key)
    if m is None:  # the stem: conv1, bn1
        key = "stem." + key
    else:
        key = f"res{int(m.group(1)) + 1}.{m.group(2)}"
    key = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", key)
    key = key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return key


def _resnet_config(depth: int) -> str:
    res2 = "\n    RES2_OUT_CHANNELS: 64" if depth < 50 else ""
    return (
        "MODEL:\n  PIXEL_MEAN: [123.675, 116.280, 103.530]\n  PIXEL_STD: [58.395, 57.120, 57.375]\n"
        f'  RESNETS:\n    DEPTH: {depth}\n    STRIDE_IN_1X1: False{res2}\nINPUT:\n  FORMAT: "RGB"'
    )


# torchvision's InvertedResidual: conv.{0,1,2,3} are (expansion conv+BN, depthwise conv+BN,
# projection conv, projection BN); without the expansion (expand ratio 1, features.1) the
# indices shift down by one. The stem and the last 1x1 (features.0, .18) are conv, BN at 0, 1.
_MV2_EXPANDED = {
    "conv.0.0.": "expand.",
    "conv.0.1.": "expand.norm.",
    "conv.1.0.": "depthwise.",
    "conv.1.1.": "depthwise.norm.",
    "conv.2.": "project.",
    "conv.3.": "project.norm.",
}
_MV2_NOT_EXPANDED = {
    "conv.0.0.": "depthwise.",
    "conv.0.1.": "depthwise.norm.",
    "conv.1.": "project.",
    "conv.2.": "project.norm.",
}


def _rename_mobilenet_v2(key: str) -> Optional[str]:
    """torchvision MobileNetV2 key -> ``dkd_det.modeling.MobileNetV2`` key
    (``features.2.conv.1.1.weight`` -> ``features.2.depthwise.norm.weight``); None for the
    ImageNet classifier and BN batch counters."""
    if key.startswith("classifier.") or key.endswith("num_batches_tracked"):
        return None
    m = re.fullmatch(r"features\.(\d+)\.(.*)", key)
    if m is None:
        raise KeyError(f"Unexpected key in a torchvision MobileNetV2 state dict: {key!r}")
    index, rest = int(m.group(1)), m.group(2)
    if index in (0, 18):
        table = {"0.": "conv.", "1.": "conv.norm."}
    else:
        table = _MV2_NOT_EXPANDED if index == 1 else _MV2_EXPANDED
    for old, new in table.items():
        if rest.startswith(old):
            return f"features.{index}.{new}{rest[len(old):]}"
    raise KeyError(f"Unexpected key in a torchvision MobileNetV2 state dict: {key!r}")


_MOBILENET_V2_CONFIG = (
    'MODEL:\n  BACKBONE:\n    NAME: "build_mobilenet_v2_fpn_backbone"\n'
    '  MOBILENET:\n    OUT_FEATURES: ["m2", "m3", "m4", "m5"]\n'
    '  FPN:\n    IN_FEATURES: ["m2", "m3", "m4", "m5"]\n'
    "  PIXEL_MEAN: [123.675, 116.280, 103.530]\n  PIXEL_STD: [58.395, 57.120, 57.375]\n"
    'INPUT:\n  FORMAT: "RGB"\n(as in configs/COCO/faster_rcnn_mv2_fpn.yaml)'
)

CONVERTERS: Dict[str, Converter] = {
    **{
        f"resnet{d}": Converter(
            f"resnet{d}",
            f"ResNet{d}_Weights.IMAGENET1K_V1",
            _rename_resnet,
            _resnet_config(d),
            file_name=f"R-{d}-torchvision.pkl",
            title=f"ResNet-{d}",
        )
        for d in (18, 34, 50, 101)
    },
    "mobilenet_v2": Converter(
        "mobilenet_v2",
        "MobileNet_V2_Weights.IMAGENET1K_V1",
        _rename_mobilenet_v2,
        _MOBILENET_V2_CONFIG,
        file_name="MobileNetV2-torchvision.pkl",
        title="MobileNetV2",
    ),
}


def _get_converter(arch: str) -> Converter:
    if arch not in CONVERTERS:
        raise ValueError(f"Unknown architecture {arch!r}; supported: {sorted(CONVERTERS)}.")
    return CONVERTERS[arch]


def _check_torchvision_hash(path: str, url: str, downloaded: bool) -> None:
    prefix = name_hash_prefix(url)
    if prefix is None:
        return
    actual = file_sha256(path)
    if actual.startswith(prefix):
        return
    if downloaded:
        os.remove(path)
    fate = "it has been deleted" if downloaded else "it is left as it is"
    raise HashMismatchError(
        f"{path!r} (torchvision's {url}): SHA-256 {actual} does not start with {prefix} "
        f"({NAME_HASH_RULE}); {fate}. Fetch the file again from {url}."
    )


def _download_torchvision(conv: Converter) -> str:
    """torchvision's weights file of ``conv`` in ``$TORCH_HOME/checkpoints`` (where torchvision's
    weights API caches it), downloaded if absent; its SHA-256 is checked against the prefix in its
    name (torch.hub's ``check_hash``), for a cached copy too."""
    url = torchvision.models.get_weight(conv.weights).url
    check_fetchable(url, f"torchvision's {conv.weights}")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if os.path.isfile(cached):
        _check_torchvision_hash(cached, url, downloaded=False)
        return cached
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        # Written to a temporary file, moved into place only when its hash matches.
        torch.hub.download_url_to_file(url, cached, hash_prefix=name_hash_prefix(url))
    except RuntimeError as e:
        if "invalid hash value" in str(e):
            raise HashMismatchError(
                f"torchvision's {conv.weights} from {url}: {e} ({NAME_HASH_RULE}); nothing was "
                "kept. Try again, or download it on another machine and pass --from-state-dict."
            ) from None
        raise OSError(str(e)) from e
    return cached


def load_torchvision_state_dict(arch: str, path: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The ImageNet weights of ``arch`` as a torchvision state dict, loaded as data
    (:func:`dkd_det.checkpoint.safe_load.load_torch_file`) and checked against the architecture.

    Args:
        arch: a key of :data:`CONVERTERS`, e.g. ``"resnet18"``.
        path: a local torchvision checkpoint (a state dict, or a dict holding one under
            ``"state_dict"`` or ``"model"``). None: torchvision's file, downloaded over https
            into ``$TORCH_HOME/checkpoints`` (or the copy cached there), its SHA-256 checked
            against the prefix in its name.

    Raises:
        OSError: the weights cannot be downloaded (offline); the message says what to do.
        HashMismatchError: the downloaded or cached file is not torchvision's, or a
            ``--from-state-dict`` file with torchvision's name for ``arch`` has another hash.
        UnsafeFileError: the file would run code when unpickled.
        ValueError: the file is not a state dict of ``arch``.
    """
    conv = _get_converter(arch)
    if path is None:
        url = torchvision.models.get_weight(conv.weights).url
        try:
            source = _download_torchvision(conv)
        except (HashMismatchError, ValueError):
            raise
        except Exception as e:  # URLError, timeouts, proxies, HTTP errors
            raise OSError(
                f"Could not download torchvision's {conv.weights} from {url} "
                f"({type(e).__name__}: {e}). Without internet, download that file on a machine "
                f"with internet and pass it with --from-state-dict FILE (or place it in "
                f"{os.path.join(torch.hub.get_dir(), 'checkpoints')})."
            ) from e
        key = f"torchvision's {conv.weights} ({source})"
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--from-state-dict {path!r}: no such file.")
        url = torchvision.models.get_weight(conv.weights).url
        if os.path.basename(path) == os.path.basename(urlparse(url).path):
            _check_torchvision_hash(path, url, downloaded=False)  # torchvision's own file name
        source, key = path, "--from-state-dict"
    try:
        state = load_torch_file(source, key)
    except (OSError, ValueError):
        raise
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError (zip), ...
        raise ValueError(
            f"{key} {source!r} is not a torch.save file ({type(e).__name__}: {e})."
        ) from e
    for k in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(k), Mapping):
            state = state[k]
    if not isinstance(state, Mapping):
        raise ValueError(f"{key} {source!r} holds a {type(state).__name__}, not a state dict.")
    model = getattr(torchvision.models, conv.builder)()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"The weights{' in ' + repr(path) if path else ''} are not torchvision's {arch}: {e}"
        ) from None
    return dict(state)


def convert_torchvision(arch: str, state: Mapping[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """Rename a torchvision state dict of ``arch`` to detectron2's backbone names.

    Returns:
        {detectron2 name: float32/int numpy array of the same shape}, classifier dropped.
    """
    conv = _get_converter(arch)
    out = {}
    for key, value in state.items():
        new = conv.rename(key)
        if new is not None:
            out[new] = value.detach().cpu().numpy()
    return out


def save_d2_pkl(model: Dict[str, np.ndarray], path: str) -> None:
    """Write ``model`` as detectron2 reads third-party ImageNet weights (name matching by
    suffix)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "torchvision", "matching_heuristics": True}, f)


def missing_weights_hint(path: str) -> str:
    """For a missing converted file (``R-18-torchvision.pkl``, ``MobileNetV2-torchvision.pkl``,
    any :attr:`Converter.file_name`), the command that creates it; else ``""``."""
    for arch, conv in CONVERTERS.items():
        if conv.file_name and os.path.basename(path) == conv.file_name:
            return (
                f" It is torchvision's ImageNet {conv.title} in detectron2's format; "
                "create it with "
                f"`python tools/convert_torchvision_to_d2.py --arch {arch} {path}` "
                "(add --from-state-dict FILE offline)."
            )
    return ""
