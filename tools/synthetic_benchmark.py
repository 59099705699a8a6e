#!/usr/bin/env python
"""The embedded benchmark: does DKD help a small detector? Measured as a paper would, on a
synthetic COCO-format world, offline, on the CPU.

    python tools/synthetic_benchmark.py                 # what `make demo` runs (~20 min, 2 cores)
    python tools/synthetic_benchmark.py --seeds 5       # more paired seeds
    python tools/synthetic_benchmark.py --eval-split val --output outputs/tune --opts KEY VALUE
                                                        # how settings are chosen: on val
    python tools/synthetic_benchmark.py --quick         # the same pipeline at toy size (tests)

The regime follows the paper's: (1) ResNet-18 and ResNet-50 backbones are pretrained on a
classification task of the same synthetic world (the stand-in for ImageNet) and saved in
detectron2's ImageNet-weights format (.pkl), loaded through MODEL.WEIGHTS; (2) an R-50-FPN
teacher is trained to convergence; (3) R-18-FPN students (plain, KD, DKD) start from the
pretrained R-18 and train a shorter schedule, each with every seed. Seeds are paired: seed k of
every variant has the same student initialisation and sees the same batches in the same order.
Settings were chosen on `val`; the report is computed on `test`, which no choice looked at.

Writes into --output (default outputs/demo; outputs/demo_quick with --quick): report.md and
report.json (AP of every run, mean and standard deviation per variant, paired differences with
95% confidence intervals, evaluation noise by a bootstrap over test images, the verdict),
ap_per_seed.png, losses.png, detections.png, pretrained/ (the backbones), and one folder per run
with detectron2's usual outputs. Reruns reuse the data, the backbones and the teacher.
"""

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import pickle
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from dkd_det.config import get_dkd_cfg
from dkd_det.data import check_datasets, register_coco_format
from dkd_det.data.synthetic import COLOURS, class_names, classification_batch, generate
from dkd_det.engine import Trainer, load_student

# The configs are the checkout's: this script lives in its tools/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "Synthetic")
TEACHER = ("teacher R-50-FPN", "teacher_r50_fpn.yaml")
# (variant, config); every variant is trained with every seed.
VARIANTS = [
    ("plain", "student_r18_fpn.yaml"),
    ("KD", "kd_r50_r18.yaml"),
    ("DKD", "dkd_r50_r18.yaml"),
]
# (backbone file, ResNet depth, config that uses it)
# `--reviewkd` (make demo REVIEWKD=1): DKD + ReviewKD's feature term, the paper's best row.
REVIEWKD = ("DKD+ReviewKD", "reviewdkd_r50_r18.yaml")
BACKBONES = [("R-18-synthetic.pkl", 18, VARIANTS[0][1]), ("R-50-synthetic.pkl", 50, TEACHER[1])]
FULL = dict(
    num_train=400,
    num_val=300,
    num_test=400,
    image_size=128,
    pretrain_steps=200,
    pretrain_size=36,
    overrides=[],
)
# Toy size: the same code path, a few iterations each; the numbers mean nothing.
QUICK = dict(
    num_train=16,
    num_val=8,
    num_test=8,
    image_size=96,
    pretrain_steps=2,
    pretrain_size=32,
    overrides=[
        "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # toy models: keep detections to evaluate
    ],
)  # fmt: skip
logger = logging.getLogger("dkd_det.synthetic_benchmark")


def say(msg: str) -> None:
    print(f"[synthetic_benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# statistics


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t distribution with ``df`` degrees of
    freedom: the CDF, integrated from the density with Simpson's rule, inverted by bisection
    (accurate to about 1e-6; no scipy needed)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, n: int = 4000) -> float:
        h = x / n
        ys = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (ys[0] + ys[-1] + 4 * sum(ys[1:-1:2]) + 2 * sum(ys[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_sd(values: Sequence[float]) -> Dict[str, float]:
    """{"mean", "sd" (sample standard deviation, n - 1; NaN for one value), "n"}."""
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """The mean of the paired differences a_k - b_k and its ``confidence`` interval from
    Student's t with n - 1 degrees of freedom: mean -+ t * sd / sqrt(n). NaN bounds for n = 1."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples must have the same, non-zero length: {len(a)}, {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    s = mean_sd(d)
    if s["n"] > 1:
        half = t_quantile(0.5 + confidence / 2, s["n"] - 1) * s["sd"] / math.sqrt(s["n"])
    else:
        half = float("nan")
    return {**s, "ci_low": s["mean"] - half, "ci_high": s["mean"] + half, "diffs": d}


def describe(name_a: str, name_b: str, diff: dict) -> str:
    """One sentence on a paired difference: what its 95% interval supports, nothing more."""
    head = f"{name_a} - {name_b}: {diff['mean']:+.2f} AP"
    if diff["n"] < 2:
        return f"{head} with one seed: no interval, no conclusion."
    span = f"95% CI [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}], {diff['n']} paired seeds"
    if diff["ci_low"] > 0:
        return f"{head} ({span}): {name_a} is better; the interval excludes 0."
    if diff["ci_high"] < 0:
        return f"{head} ({span}): {name_a} is worse; the interval excludes 0."
    return f"{head} ({span}): the interval includes 0, no difference shown."


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def bootstrap_ap(gt_json: str, results: Dict[str, str], num: int, seed: int = 0) -> dict:
    """Evaluation noise: COCO box AP (percent) of each model in ``results`` ({name: the
    evaluator's coco_instances_results.json}) on ``num`` resamples of the test images (with
    replacement, the same resample for every model). pycocotools matches each image once; each
    resample only re-accumulates. Returns {"ap": {name: [AP per resample]}}."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with _quiet():
        coco = COCO(gt_json)
    evals = {}
    for name, path in results.items():
        with open(path) as f:
            dets = json.load(f)
        with _quiet():
            e = COCOeval(coco, coco.loadRes(dets) if dets else COCO(), "bbox")
            e.params.areaRng, e.params.areaRngLbl, e.params.maxDets = [[0, 1e10]], ["all"], [100]
            e.evaluate()
        evals[name] = (e, list(e.evalImgs))
    img_ids = list(evals[next(iter(evals))][0].params.imgIds)
    num_imgs, rng = len(img_ids), np.random.default_rng(seed)
    out = {name: [] for name in results}
    for _ in range(num):
        pick = rng.integers(num_imgs, size=num_imgs)
        for name, (e, full) in evals.items():
            num_cats = len(e.params.catIds)
            e.evalImgs = [full[k * num_imgs + i] for k in range(num_cats) for i in pick]
            e.params.imgIds = [img_ids[i] for i in pick]
            e._paramsEval = copy.deepcopy(e.params)
            with _quiet():
                e.accumulate()
            precision = e.eval["precision"][..., 0, 0]  # (IoU, recall, class)
            valid = precision > -1
            out[name].append(100 * float(precision[valid].mean()) if valid.any() else float("nan"))
    return {"ap": out}


# ----------------------------------------------------------------------------------------------
# pretraining (the stand-in for ImageNet)


def pretrain_backbone(depth: int, path: str, steps: int, size: int, batch: int = 64, seed=0):
    """Train detectron2's ResNet-``depth`` (BN, torchvision-style strides, ImageNet RGB
    normalisation as configs/Synthetic expect) with a linear classifier on
    :func:`classification_batch`, then write its weights as detectron2 reads ImageNet weights
    (``{"model": {name: array}, "matching_heuristics": True}``, BN statistics included for
    FrozenBN). Returns the accuracy (0..1) on 512 held-out images."""
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    num_classes = len(class_names(30))
    head = torch.nn.Linear(backbone.output_shape()["res5"].channels, num_classes)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps, pct_start=0.15)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)

    def logits(images):
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std
        return head(backbone(x)["res5"].mean((2, 3)))

    for _ in range(steps):
        images, labels = classification_batch(rng, batch, size)
        loss = F.cross_entropy(logits(images), torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    backbone.eval()
    images, labels = classification_batch(np.random.default_rng(seed + 10**6), 512, size)
    with torch.no_grad():
        accuracy = float((logits(images).argmax(1).numpy() == labels).mean())
    state = {
        k: v.detach().numpy()
        for k, v in backbone.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        pickle.dump(
            {
                "model": state,
                "__author__": "dkd-det synthetic pretraining",
                "matching_heuristics": True,
            },
            f,
        )
    os.replace(path + ".tmp", path)  # a rerun never finds half a file
    return accuracy


# ----------------------------------------------------------------------------------------------
# detection runs


def build_cfg(config, output, data_dir, split, opts: Sequence[str], teacher_opts=(), **over):
    """A frozen config for one run of the benchmark, its paths moved under ``output`` and
    ``data_dir``, evaluated on ``split``; ``teacher_opts`` are the teacher's overrides (as it
    was trained). ``over`` may give ``name`` (the run's folder) and ``seed``."""
    splits = ("train", "val", "test")
    coco_format = [(f"synthetic_{s}", f"{data_dir}/{s}.json", f"{data_dir}/{s}") for s in splits]
    cfg = get_dkd_cfg(
        os.path.join(CONFIGS, config),
        [
            "DATASETS.COCO_FORMAT", repr(coco_format),
            "DATASETS.TEST", f"('synthetic_{split}',)",
            "MODEL.TEACHER.CONFIG_FILE", os.path.join(CONFIGS, TEACHER[1]),
            "MODEL.TEACHER.WEIGHTS", os.path.join(output, "teacher", "model_final.pth"),
            "MODEL.TEACHER.OPTS", repr(list(teacher_opts)),
        ]
        + list(opts),
    )  # fmt: skip
    depth = cfg.MODEL.RESNETS.DEPTH
    backbone = next(name for name, d, _ in BACKBONES if d == depth)
    cfg.MODEL.WEIGHTS = os.path.join(output, "pretrained", backbone)
    cfg.OUTPUT_DIR = os.path.join(output, over.get("name", os.path.splitext(config)[0]))
    if "seed" in over:
        cfg.SEED = over["seed"]
    cfg.freeze()
    register_coco_format(cfg)
    check_datasets(cfg)
    return cfg


def train_seconds_per_iter(output_dir: str) -> float:
    """Median of detectron2's per-iteration training time (s) over all logged windows."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        times = [r["time"] for r in map(json.loads, f) if "time" in r]
    return statistics.median(times) if times else float("nan")


def train_and_evaluate(cfg, threads: int = 0, log_file: Optional[str] = None) -> dict:
    """Train one model with the product's Trainer (as tools/train_net.py does) and return the
    final COCO evaluation on ``cfg.DATASETS.TEST[0]`` with the training time per iteration.
    With ``log_file`` (a worker process), detectron2 logs there only, not to stdout."""
    if threads:
        torch.set_num_threads(threads)
    if log_file:  # setup_logger is cached: once per process and file
        for name in ("detectron2", "dkd_det"):
            setup_logger(log_file, distributed_rank=1, name=name)
    register_coco_format(cfg)
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    return {
        "bbox": dict(results["bbox"]),
        "train_s_per_iter": train_seconds_per_iter(cfg.OUTPUT_DIR),
    }


def evaluate(cfg) -> dict:
    """The final COCO evaluation of a trained model on ``cfg.DATASETS.TEST[0]``."""
    model = load_student(cfg, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    bbox = dict(Trainer.test(cfg, model)["bbox"])
    return {"bbox": bbox, "train_s_per_iter": train_seconds_per_iter(cfg.OUTPUT_DIR)}


def results_file(cfg) -> str:
    return os.path.join(
        cfg.OUTPUT_DIR, "inference", cfg.DATASETS.TEST[0], "coco_instances_results.json"
    )


# ----------------------------------------------------------------------------------------------
# pictures


def _inputs(cfg, records):
    for r in records:
        image = utils.read_image(r["file_name"], format=cfg.INPUT.FORMAT)
        tensor = torch.as_tensor(
            np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32
        )
        yield image, {"image": tensor, "height": r["height"], "width": r["width"]}


@torch.no_grad()
def inference_ms(cfg, model, records, warmup: int = 3) -> float:
    """Median inference latency per image (ms), batch 1, after ``warmup`` images."""
    times = []
    for i, (_, x) in enumerate(_inputs(cfg, records)):
        start = time.perf_counter()
        model([x])
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times) if times else float("nan")


@torch.no_grad()
def draw_detections(cfg, teacher, student, records, path, threshold=0.5) -> None:
    """A grid: one image per row, the teacher's detections left and the DKD student's right."""
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    rows = []
    for image, x in _inputs(cfg, records):
        rgb = image if cfg.INPUT.FORMAT == "RGB" else image[:, :, ::-1]
        panels = []
        for model, title in ((teacher, "teacher"), (student, "DKD student")):
            inst = model([x])[0]["instances"].to("cpu")
            vis = Visualizer(rgb, meta, scale=3.0).draw_instance_predictions(
                inst[inst.scores >= threshold]
            )
            panel = vis.get_image()
            if not rows:  # a title above each column
                font, white = cv2.FONT_HERSHEY_SIMPLEX, (255, 255, 255)
                cv2.putText(panel, title, (6, 22), font, 0.7, white, 2, cv2.LINE_AA)
            panels.append(panel)
        gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
        rows.append(np.concatenate([panels[0], gap, panels[1]], axis=1))
    cv2.imwrite(path, np.concatenate(rows, axis=0)[:, :, ::-1])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(runs: Dict[str, str], path: str) -> None:
    """Training curves from each run's metrics.json: detection losses and distillation terms."""
    plt = _pyplot()
    keys = [
        ("total_loss", "total loss"),
        ("loss_cls", "loss_cls (box classification)"),
        ("loss_box_reg", "loss_box_reg"),
        ("distill", "distillation: loss_kd / loss_dkd, dkd/tckd, dkd/nckd"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for name, out in runs.items():
        with open(os.path.join(out, "metrics.json")) as f:
            records = [r for r in map(json.loads, f) if "total_loss" in r]
        it = [r["iteration"] for r in records]
        for ax, (key, _) in zip(axes, keys):
            names = ("loss_kd", "loss_dkd", "dkd/tckd", "dkd/nckd") if key == "distill" else (key,)
            for k in names:
                if records and k in records[0]:
                    label = f"{name}: {k}" if key == "distill" else name
                    ax.plot(it, [r[k] for r in records], marker=".", label=label)
    for ax, (_, title) in zip(axes, keys):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_ap(per_variant: Dict[str, List[float]], teacher_ap: float, path: str) -> None:
    """AP per variant: every seed a dot (seeds joined across variants, they are paired), the
    mean with its 95% interval as a bar; the teacher as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(per_variant)
    for x, name in enumerate(names):
        aps = per_variant[name]
        s = mean_sd(aps)
        half = t_quantile(0.975, s["n"] - 1) * s["sd"] / math.sqrt(s["n"]) if s["n"] > 1 else 0
        ax.errorbar(
            [x + 0.15], [s["mean"]], yerr=[[half], [half]], fmt="s", color="black", capsize=6
        )
        ax.scatter([x - 0.1] * len(aps), aps, color="tab:blue", zorder=3)
    for k in range(len(per_variant[names[0]])):
        ax.plot(
            [x - 0.1 for x in range(len(names))],
            [per_variant[n][k] for n in names],
            color="tab:blue",
            alpha=0.3,
        )
    ax.axhline(teacher_ap, color="tab:red", linestyle="--", label=f"teacher {teacher_ap:.2f}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("COCO box AP (test split)")
    ax.set_title(
        "every seed (dots, paired seeds joined); mean and 95% CI (square, bar)", fontsize=8
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# report


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def write_report(report: dict, output: str) -> str:
    """report.json and report.md; returns the markdown that is also printed."""
    variants, seeds = report["variants"], report["seeds"]
    lines = [
        "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for name, v in variants.items():
        cells = [_fmt(ap) for ap in v["ap"]] + [_fmt(v["mean"]), _fmt(v["sd"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    t = report["teacher"]
    lines.append(f"| teacher R-50-FPN | {_fmt(t['ap'])} (one model) |" + " |" * (len(seeds) + 1))
    diffs = ["| paired difference | mean | 95% CI | per seed |", "|---|---|---|---|"]
    for name, d in report["differences"].items():
        ci = f"[{_fmt(d['ci_low'], '+.2f')}, {_fmt(d['ci_high'], '+.2f')}]"
        per_seed = ", ".join(_fmt(x, "+.2f") for x in d["diffs"])
        diffs.append(f"| {name} | {_fmt(d['mean'], '+.2f')} | {ci} | {per_seed} |")
    noise = report.get("evaluation_noise")
    noise_md = ""
    if noise:
        noise_md = (
            f"Evaluation noise (bootstrap over the {noise['num_images']} {report['split']} images, "
            f"{noise['resamples']} resamples, seed {seeds[0]}): sd of one model's AP "
            f"{_fmt(noise['sd_ap'])}; sd of the paired difference DKD - plain "
            f"{_fmt(noise['sd_diff'])} AP (seed-to-seed sd of that difference: "
            f"{_fmt(report['differences']['DKD - plain']['sd'])}).\n\n"
        )
    cost = ["| model | parameters | train s/iter | infer ms/img |", "|---|---|---|---|"]
    for name, c in report["cost"].items():
        cost.append(
            f"| {name} | {c['parameters'] / 1e6:.2f}M | {_fmt(c['train_s_per_iter'], '.3f')} "
            f"| {_fmt(c['inference_ms'], '.1f')} |"
        )
    body = (
        f"COCO box AP (percent) on the **{report['split']}** split "
        f"({report['num_eval_images']} images), students R-18-FPN, teacher R-50-FPN.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(diffs)
        + "\n\n"
        + noise_md
        + "**Verdict.** "
        + " ".join(report["verdict"])
        + "\n"
    )
    with open(os.path.join(output, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=lambda x: None)
    with open(os.path.join(output, "report.md"), "w") as f:
        f.write("# dkd-det embedded benchmark: synthetic shapes, paired seeds\n\n")
        if report["quick"]:
            f.write("**QUICK run: toy size; the numbers only show that the pipeline works.**\n\n")
        f.write(body + "\n" + "\n".join(cost) + "\n\n")
        f.write(
            "AP values are pycocotools' COCO box AP from detectron2's COCOEvaluator; each run's "
            "evaluator output is in `<run>/inference/`. Training time is detectron2's median time "
            "per iteration; inference the median latency per image, batch 1, CPU. Intervals: "
            "mean paired difference -+ t(0.975, n-1) * sd / sqrt(n). Wall time: "
            f"{report['wall_seconds'] / 60:.1f} min.\n\n"
            "![AP per seed](ap_per_seed.png)\n\n![losses](losses.png)\n\n"
            "![detections: teacher (left), DKD student (right)](detections.png)\n"
        )
    return body


# ----------------------------------------------------------------------------------------------
# the pipeline


def _run_all(cfgs: List, jobs: int, threads: int = 0) -> List[dict]:
    """Train and evaluate every config: in this process (jobs 1, detectron2's logs on stdout)
    or in ``jobs`` processes with ``threads`` (default ``cpu_count // jobs``) threads each
    (logs in log_workers.txt)."""
    if jobs <= 1:
        out = []
        for i, cfg in enumerate(cfgs):
            say(f"  run {i + 1}/{len(cfgs)}: {os.path.basename(cfg.OUTPUT_DIR)}")
            out.append(train_and_evaluate(cfg))
        return out
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        log = os.path.join(os.path.dirname(cfgs[0].OUTPUT_DIR), "log_workers.txt")
        futures = [pool.submit(train_and_evaluate, cfg, threads, log) for cfg in cfgs]
        out = []
        for cfg, fut in zip(cfgs, futures):
            out.append(fut.result())
            say(f"  {os.path.basename(cfg.OUTPUT_DIR)}: {out[-1]['bbox']['AP']:.2f} AP")
        return out


def run(args) -> dict:
    """The whole pipeline; returns the report (also written to ``args.output``)."""
    size = QUICK if args.quick else FULL
    start = time.time()
    output, data_dir, split = args.output, args.data, args.eval_split
    os.makedirs(output, exist_ok=True)
    for name in ("detectron2", "dkd_det"):
        setup_logger(output=os.path.join(output, "log.txt"), name=name)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    seeds = list(range(args.seeds))
    student_opts = size["overrides"] + list(args.opts)
    teacher_opts = size["overrides"] + list(args.teacher_opts)

    if os.path.isfile(os.path.join(data_dir, "test.json")):
        say(f"1/6 data: reusing {data_dir}")
    else:
        n = (size["num_train"], size["num_val"], size["num_test"])
        say(f"1/6 data: writing {n[0]} train, {n[1]} val, {n[2]} test images to {data_dir}")
        generate(data_dir, *n, image_size=size["image_size"])

    for file_name, depth, _ in BACKBONES:
        path = os.path.join(output, "pretrained", file_name)
        if os.path.isfile(path):
            say(f"2/6 pretrained ResNet-{depth}: reusing {path}")
            continue
        t = time.time()
        steps = size["pretrain_steps"]
        acc = pretrain_backbone(depth, path, steps, size["pretrain_size"])
        say(
            f"2/6 pretrained ResNet-{depth} on the synthetic classification task in "
            f"{time.time() - t:.0f} s ({steps} steps): {100 * acc:.1f}% accuracy on 30 classes"
        )

    tcfg = build_cfg(TEACHER[1], output, data_dir, split, teacher_opts, name="teacher")
    DatasetCatalog.get(tcfg.DATASETS.TEST[0])  # loads the JSON, which sets thing_classes
    colours = [COLOURS[c] for _, c in class_names(tcfg.MODEL.ROI_HEADS.NUM_CLASSES)]
    MetadataCatalog.get(tcfg.DATASETS.TEST[0]).set(thing_colors=colours)
    final = os.path.join(tcfg.OUTPUT_DIR, "model_final.pth")
    t = time.time()
    if os.path.isfile(final) and not args.retrain_teacher:
        say(f"3/6 teacher: reusing {final}")
        teacher = evaluate(tcfg)
    else:
        say(f"3/6 training the teacher: {tcfg.SOLVER.MAX_ITER} iterations")
        teacher = train_and_evaluate(tcfg)
    say(f"teacher: {teacher['bbox']['AP']:.2f} AP on {split} ({time.time() - t:.0f} s)")

    variant_list = VARIANTS + ([REVIEWKD] if args.reviewkd else [])
    runs = [(v, c, s) for s in seeds for v, c in variant_list]
    cfgs = [
        build_cfg(
            c, output, data_dir, split, student_opts, teacher_opts, name=f"{v}_seed{s}", seed=s
        )
        for v, c, s in runs
    ]
    iters = cfgs[0].SOLVER.MAX_ITER
    n = len(variant_list)
    say(f"4/6 students: {n} variants x {len(seeds)} paired seeds, {iters} iterations")
    t = time.time()
    results = _run_all(cfgs, args.jobs, args.threads)
    say(f"students trained and evaluated in {(time.time() - t) / 60:.1f} min")

    say("5/6 statistics, evaluation noise, inference time and pictures")
    by = {(v, s): (cfg, r) for (v, _, s), cfg, r in zip(runs, cfgs, results)}
    variants = {}
    for v, _ in variant_list:
        aps = [by[v, s][1]["bbox"]["AP"] for s in seeds]
        variants[v] = {"ap": aps, **mean_sd(aps)}
    differences = {
        f"{a} - {b}": paired_difference(variants[a]["ap"], variants[b]["ap"])
        for a, b in (("DKD", "plain"), ("DKD", "KD"), ("KD", "plain"))
        + ((REVIEWKD[0], "DKD"), (REVIEWKD[0], "plain"))
        if a in variants and b in variants
    }
    verdict = [describe(*name.split(" - "), d) for name, d in differences.items()]
    lead = teacher["bbox"]["AP"] - variants["plain"]["mean"]
    verdict.append(f"The teacher leads the plain student by {lead:.2f} AP.")
    noise = None
    if args.bootstrap > 0:
        gt = MetadataCatalog.get(tcfg.DATASETS.TEST[0]).json_file
        files = {v: results_file(by[v, seeds[0]][0]) for v in ("DKD", "plain")}
        boot = bootstrap_ap(gt, files, args.bootstrap)["ap"]
        diff = [a - b for a, b in zip(boot["DKD"], boot["plain"])]
        noise = {
            "num_images": len(DatasetCatalog.get(tcfg.DATASETS.TEST[0])),
            "resamples": args.bootstrap,
            "sd_ap": statistics.stdev(boot["DKD"]),
            "sd_diff": statistics.stdev(diff),
        }

    records = DatasetCatalog.get(tcfg.DATASETS.TEST[0])
    student_cfg, _ = by["DKD", seeds[0]]
    models = {
        "teacher R-50-FPN": (tcfg, load_student(tcfg, final)),
        "student R-18-FPN": (
            student_cfg,
            load_student(student_cfg, os.path.join(student_cfg.OUTPUT_DIR, "model_final.pth")),
        ),
    }
    cost = {}
    for name, (cfg, model) in models.items():
        train_s = [r["train_s_per_iter"] for (v, s), (_, r) in by.items() if v == "plain"]
        cost[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_s_per_iter": (
                teacher["train_s_per_iter"] if "teacher" in name else statistics.median(train_s)
            ),
            "inference_ms": inference_ms(cfg, model, records[:20]),
        }
    for v, _ in variant_list[1:]:
        cost[f"{v} step (student + teacher)"] = {
            "parameters": cost["student R-18-FPN"]["parameters"],
            "train_s_per_iter": statistics.median(by[v, s][1]["train_s_per_iter"] for s in seeds),
            "inference_ms": cost["student R-18-FPN"]["inference_ms"],
        }
    plot_ap(
        {v: variants[v]["ap"] for v, _ in variant_list},
        teacher["bbox"]["AP"],
        os.path.join(output, "ap_per_seed.png"),
    )
    plot_losses(
        {
            "teacher": tcfg.OUTPUT_DIR,
            **{f"{v} seed {seeds[0]}": by[v, seeds[0]][0].OUTPUT_DIR for v, _ in variant_list},
        },
        os.path.join(output, "losses.png"),
    )
    draw_detections(
        student_cfg,
        models["teacher R-50-FPN"][1],
        models["student R-18-FPN"][1],
        records[:3],
        os.path.join(output, "detections.png"),
    )

    say("6/6 report")
    report = {
        "quick": args.quick,
        "split": split,
        "num_eval_images": len(records),
        "seeds": seeds,
        "settings": {"student_opts": list(args.opts), "teacher_opts": list(args.teacher_opts)},
        "teacher": {
            "ap": teacher["bbox"]["AP"],
            "bbox": teacher["bbox"],
            "evaluator_output": results_file(tcfg),
        },
        "variants": variants,
        "runs": [
            {
                "variant": v,
                "seed": s,
                "config": os.path.relpath(os.path.join(CONFIGS, c), ROOT),
                "bbox": by[v, s][1]["bbox"],
                "train_s_per_iter": by[v, s][1]["train_s_per_iter"],
                "evaluator_output": results_file(by[v, s][0]),
            }
            for v, c, s in runs
        ],
        "differences": differences,
        "evaluation_noise": noise,
        "verdict": verdict,
        "cost": cost,
        "wall_seconds": time.time() - start,
    }
    body = write_report(report, output)
    say(f"done in {report['wall_seconds'] / 60:.1f} min; report in {output}/report.md\n\n{body}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="toy size, for the tests (~2 min)")
    parser.add_argument("--seeds", type=int, default=3, help="paired seeds per variant (default 3)")
    parser.add_argument("--eval-split", choices=("test", "val"), default="test",
                        help="test for the report; val to choose settings")  # fmt: skip
    parser.add_argument("--output", help="default: outputs/demo (outputs/demo_quick with --quick)")
    parser.add_argument("--data", help="default: datasets/synthetic(_quick)")
    parser.add_argument(
        "--reviewkd", action="store_true", help="also DKD + ReviewKD (3 runs more per seed)"
    )
    parser.add_argument("--retrain-teacher", action="store_true", help="even if trained already")
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1),
        help="students trained in parallel processes (default 2: on 2 cores, two 1-thread "
        "processes train about 1.3x faster than one 2-thread process)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per process (0: cores / jobs)"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=100,
        help="resamples of the evaluated images, for the evaluation noise (0: off)",
    )
    parser.add_argument(
        "--teacher-opts", nargs="*", default=[], help="KEY VALUE for the teacher only"
    )
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE for every run"
    )
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    args.output = args.output or f"outputs/demo{suffix}"
    args.data = args.data or f"datasets/synthetic{suffix}"
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
