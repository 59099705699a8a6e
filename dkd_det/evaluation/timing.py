"""Cost measurements shared by the benchmarks: wall time of callables in interleaved rounds,
peak memory, and the one setting that makes random-weight detectors' inference comparable.

Times are compared within a round: every callable runs once per round, so that the machine's
drift (another process on a shared CPU, clock changes, a warm or cold cache) hits all of them
alike, and a ratio is taken round by round; report its median and quartiles, not one ratio of
two medians measured minutes apart.
"""

import os
import time
from typing import Callable, Dict, List, Sequence

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.structures import Boxes, Instances

from .stats import spread

__all__ = [
    "time_ms",
    "interleaved_ms",
    "ratio_spread",
    "peak_mib",
    "peak_rss_mib",
    "device_description",
    "random_inputs",
    "calibrate_norms",
    "equalise_candidates",
]


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str = "cpu") -> float:
    """Wall time of one call of ``fn`` in milliseconds; on a GPU (``device`` "cuda...")
    between two ``torch.cuda.synchronize()``, so that queued kernels are counted."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000


def interleaved_ms(
    fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: str = "cpu"
) -> Dict[str, List[float]]:
    """Time every callable once per round, for ``warmup + repeats`` rounds; the first
    ``warmup`` rounds (allocator, caches, lazy initialisation) are not kept. The order rotates
    by one each round (A B C, B C A, C A B, ...) so that no callable always follows the same
    one.

    Returns:
        {name: [ms of each kept round]}: index r of every list is the same round, so ratios
        compare round by round (:func:`ratio_spread`).
    """
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            ms = time_ms(fns[name], device)
            if r >= warmup:
                times[name].append(ms)
    return times


def ratio_spread(num: Sequence[float], den: Sequence[float]) -> Dict[str, float]:
    """:func:`dkd_det.evaluation.spread` (median, quartiles, min, max) of the per-round
    ratios ``num[r] / den[r]`` of two :func:`interleaved_ms` lists."""
    if len(num) != len(den) or not num:
        raise ValueError(f"ratios need rounds of the same, non-zero count: {len(num)}, {len(den)}")
    return spread([a / b for a, b in zip(num, den)])


def peak_mib(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak tensor memory (MiB) allocated while ``fn`` runs, above what was allocated before:
    ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the running peak of the
    allocations and frees that torch's profiler records."""
    if str(device).startswith("cuda"):
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def peak_rss_mib(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak resident memory (MiB) of the process while ``fn`` runs, above what was resident
    before: unlike torch's profiler it also sees other libraries' allocations (ONNX Runtime).
    Linux: resets the high-water mark through /proc/self/clear_refs; elsewhere, and on a GPU,
    :func:`peak_mib` (tensor memory). What ``fn`` returns is kept alive until the memory has
    been read (the kernel may update the high-water mark only lazily, on unmapping)."""
    if str(device).startswith("cuda") or not os.path.exists("/proc/self/clear_refs"):
        return peak_mib(fn, device)

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    out = fn()
    peak = max(status("VmHWM:"), status("VmRSS:"))
    del out
    return (peak - before) / 1024


def device_description(device: str) -> str:
    """The GPU's name, or "CPU, <n> threads" (torch's intra-op threads)."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {torch.get_num_threads()} threads"


def random_inputs(
    batch: int, height: int, width: int, num_classes: int, boxes: int = 4, seed: int = 0
) -> List[dict]:
    """``batch`` random images as detectron2 models take them in training: ``{"image": (3,
    height, width) float32 in [0, 255], "instances": ``boxes`` ground-truth boxes (XYXY,
    pixels, at least 16 px wide and high) with classes in [0, num_classes), "height",
    "width"}``; the same for the same ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        xy = torch.rand(boxes, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = 16 + torch.rand(boxes, 2, generator=g) * torch.tensor([width * 0.35, height * 0.35])
        inst = Instances(
            (height, width),
            gt_boxes=Boxes(torch.cat([xy, xy + wh], 1)),
            gt_classes=torch.randint(0, num_classes, (boxes,), generator=g),
        )
        image = torch.randint(0, 256, (3, height, width), generator=g).float()
        out.append({"image": image, "instances": inst, "height": height, "width": width})
    return out


@torch.no_grad()
def calibrate_norms(model: torch.nn.Module, batched_inputs: List[dict]) -> int:
    """Set the statistics (``running_mean``, ``running_var``) of every batch norm in the
    backbone of a random-weight detectron2 ``model`` (FrozenBN or BN) to those of its input
    on ``batched_inputs``, layer after layer in one forward pass: normalised activations, as a
    trained network has.

    Why: a random ResNet with FrozenBN's identity statistics multiplies the activations at
    every block; a random R-101's FPN features reach about 1e7, its RPN's boxes are all
    degenerate and it keeps no proposal, so its box head and post-processing never run and its
    inference looks cheaper than a random R-18's. Calibrated, every model keeps its
    ``POST_NMS_TOPK`` proposals (with RPN NMS off).

    Args:
        batched_inputs: images as the model takes them (``[{"image": (3, H, W)}]``).

    Returns:
        the number of norm layers calibrated.
    """
    norms = [
        m
        for m in model.backbone.modules()
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.modules.batchnorm._BatchNorm))
    ]

    def set_stats(module, args):
        x = args[0].float()
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3), unbiased=False))

    handles = [m.register_forward_pre_hook(set_stats) for m in norms]
    was_training = model.training
    try:
        model.eval()  # BN normalises with the running statistics just set
        model.backbone(model.preprocess_image(batched_inputs).tensor)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return len(norms)


@torch.no_grad()
def equalise_candidates(model: torch.nn.Module, batched_input: dict, num: int) -> Dict:
    """Set the test score threshold of a detectron2 Faster R-CNN ``model`` (its
    ``roi_heads.box_predictor.test_score_thresh``) so that exactly ``num`` (box, class) pairs
    of ``batched_input`` pass it into the per-class NMS.

    Why: with random weights, how many of the R x K scores pass a fixed threshold (0.05) is an
    accident of the initialisation, from none to all, and per-class NMS over up to R x K boxes
    can cost more than the backbone; two models timed that way are not compared. Passing the
    same ``num`` candidates to every model prices post-processing equally, as trained models
    about do. Call it once per model, on the input that will be timed; exports traced after it
    keep the threshold.

    Args:
        batched_input: one image as the model takes it (``{"image": (3, H, W) tensor}``).
        num: candidates to keep; all pass if the image has at most ``num``.

    Returns:
        ``{"threshold", "proposals", "candidates"}``: the threshold set, the proposals that
        reached the box head (R) and the (box, class) pairs above the threshold.
    """
    predictor = model.roi_heads.box_predictor
    seen = []
    handle = predictor.register_forward_hook(lambda module, args, out: seen.append(out))
    was_training = model.training
    try:
        model.eval()
        model([batched_input])
    finally:
        handle.remove()
        model.train(was_training)
    # predict_probs splits by len(proposals) per image: one image of R rows.
    probs = predictor.predict_probs(seen[-1], [seen[-1][0]])[0][:, :-1].flatten()
    if probs.numel() > num:
        threshold = float(probs.topk(num + 1).values[-1])
    else:
        threshold = -1.0
    predictor.test_score_thresh = threshold
    return {
        "threshold": threshold,
        "proposals": len(seen[-1][0]),
        "candidates": int((probs > threshold).sum()),
    }
