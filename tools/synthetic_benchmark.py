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

The stages are the functions below, in order: prepare_data, pretrain_backbones, train_teacher,
train_students, compare, measure_cost, draw_pictures, write_report; the statistics, the
bootstrap, the tables and the plots are dkd_det.evaluation's.
"""

import argparse
import json
import logging
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
from dkd_det.evaluation import (
    bootstrap_difference,
    describe,
    difference_table,
    fmt,
    mean_sd,
    paired_difference,
    plot_ap_per_seed,
    plot_losses,
    results_file,
    seconds_per_iter,
    seed_table,
    time_ms,
)

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
# `--reviewkd` (make demo REVIEWKD=1): DKD + ReviewKD's feature term, the paper's best row.
REVIEWKD = ("DKD+ReviewKD", "reviewdkd_r50_r18.yaml")
# The paired differences reported, when both variants ran.
DIFFERENCES = [
    ("DKD", "plain"),
    ("DKD", "KD"),
    ("KD", "plain"),
    (REVIEWKD[0], "DKD"),
    (REVIEWKD[0], "plain"),
]
# (backbone file, ResNet depth, config that uses it)
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
# stage 1 and 2: data, pretrained backbones (the stand-in for ImageNet)


def prepare_data(data_dir: str, size: dict) -> None:
    """The synthetic train/val/test sets in ``data_dir`` (COCO-format JSON and images), unless
    they are there already."""
    if os.path.isfile(os.path.join(data_dir, "test.json")):
        say(f"1/6 data: reusing {data_dir}")
        return
    n = (size["num_train"], size["num_val"], size["num_test"])
    say(f"1/6 data: writing {n[0]} train, {n[1]} val, {n[2]} test images to {data_dir}")
    generate(data_dir, *n, image_size=size["image_size"])


def pretrain_backbones(output: str, size: dict) -> None:
    """``output/pretrained/R-18-synthetic.pkl`` and ``R-50-synthetic.pkl``, unless there."""
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
# stages 3 and 4: detection runs


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
        "train_s_per_iter": seconds_per_iter(cfg.OUTPUT_DIR),
    }


def evaluate(cfg) -> dict:
    """The final COCO evaluation of a trained model on ``cfg.DATASETS.TEST[0]``."""
    model = load_student(cfg, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    bbox = dict(Trainer.test(cfg, model)["bbox"])
    return {"bbox": bbox, "train_s_per_iter": seconds_per_iter(cfg.OUTPUT_DIR)}


def run_all(cfgs: List, jobs: int, threads: int = 0) -> List[dict]:
    """:func:`train_and_evaluate` every config: in this process (jobs 1, detectron2's logs on
    stdout) or in ``jobs`` processes with ``threads`` (default ``cpu_count // jobs``) threads
    each (logs in log_workers.txt)."""
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


def train_teacher(args, size: dict):
    """Stage 3: the teacher's config and its evaluation on ``args.eval_split``: trained, or
    reused from ``output/teacher/model_final.pth`` (unless ``--retrain-teacher``)."""
    tcfg = build_cfg(
        TEACHER[1],
        args.output,
        args.data,
        args.eval_split,
        size["overrides"] + list(args.teacher_opts),
        name="teacher",
    )
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
    say(f"teacher: {teacher['bbox']['AP']:.2f} AP on {args.eval_split} ({time.time() - t:.0f} s)")
    return tcfg, teacher


def train_students(args, size: dict, variants: Sequence, seeds: Sequence[int]) -> Dict:
    """Stage 4: every (variant, config) of ``variants`` with every seed, trained and evaluated
    (:func:`run_all`). Returns {(variant, seed): (cfg, result)}, seed-major as trained."""
    runs = [(v, c, s) for s in seeds for v, c in variants]
    cfgs = [
        build_cfg(
            c,
            args.output,
            args.data,
            args.eval_split,
            size["overrides"] + list(args.opts),
            size["overrides"] + list(args.teacher_opts),
            name=f"{v}_seed{s}",
            seed=s,
        )
        for v, c, s in runs
    ]
    iters = cfgs[0].SOLVER.MAX_ITER
    say(f"4/6 students: {len(variants)} variants x {len(seeds)} paired seeds, {iters} iterations")
    t = time.time()
    results = run_all(cfgs, args.jobs, args.threads)
    say(f"students trained and evaluated in {(time.time() - t) / 60:.1f} min")
    return {(v, s): (cfg, r) for (v, _, s), cfg, r in zip(runs, cfgs, results)}


# ----------------------------------------------------------------------------------------------
# stage 5: statistics, cost, pictures


def compare(by: Dict, variants, seeds, teacher_ap: float, gt_json: str, bootstrap: int) -> dict:
    """AP per seed, mean and sd of every variant, the paired differences of
    :data:`DIFFERENCES` with their 95% intervals, the evaluation noise of DKD - plain (a
    bootstrap of ``bootstrap`` resamples of the test images ``gt_json``, seed 0's runs; None
    for 0) and the verdict (one sentence each)."""
    per_variant = {}
    for v in variants:
        aps = [by[v, s][1]["bbox"]["AP"] for s in seeds]
        per_variant[v] = {"ap": aps, **mean_sd(aps)}
    differences = {
        f"{a} - {b}": paired_difference(per_variant[a]["ap"], per_variant[b]["ap"])
        for a, b in DIFFERENCES
        if a in per_variant and b in per_variant
    }
    verdict = [describe(*name.split(" - "), d) for name, d in differences.items()]
    lead = teacher_ap - per_variant["plain"]["mean"]
    verdict.append(f"The teacher leads the plain student by {lead:.2f} AP.")
    noise = None
    if bootstrap > 0:
        dkd, plain = (results_file(by[v, seeds[0]][0]) for v in ("DKD", "plain"))
        noise = bootstrap_difference(gt_json, dkd, plain, bootstrap)
    return {
        "variants": per_variant,
        "differences": differences,
        "evaluation_noise": noise,
        "verdict": verdict,
    }


def trained_models(tcfg, student_cfg) -> Dict:
    """{"teacher R-50-FPN": (cfg, model), "student R-18-FPN": (cfg, model)}, each loaded
    strictly from its run's model_final.pth, in eval mode."""
    return {
        name: (cfg, load_student(cfg, os.path.join(cfg.OUTPUT_DIR, "model_final.pth")))
        for name, cfg in (("teacher R-50-FPN", tcfg), ("student R-18-FPN", student_cfg))
    }


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
    times = [time_ms(lambda: model([x])) for _, x in _inputs(cfg, records)][warmup:]
    return statistics.median(times) if times else float("nan")


def measure_cost(models: Dict, by: Dict, teacher: dict, variants: Sequence[str], seeds, records):
    """Parameters, training s/iter (median over the seeds) and inference ms/image of the
    teacher and the student, and the training step of each distillation variant.

    Args:
        models: {"teacher R-50-FPN": (cfg, model), "student R-18-FPN": (cfg, model)}.
    """
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
    for v in variants[1:]:
        cost[f"{v} step (student + teacher)"] = {
            "parameters": cost["student R-18-FPN"]["parameters"],
            "train_s_per_iter": statistics.median(by[v, s][1]["train_s_per_iter"] for s in seeds),
            "inference_ms": cost["student R-18-FPN"]["inference_ms"],
        }
    return cost


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


def draw_pictures(output: str, by: Dict, variants, seeds, teacher_ap, tcfg, models, records):
    """ap_per_seed.png, losses.png (the teacher and seed 0 of every variant) and
    detections.png (teacher and DKD student on the first 3 evaluated images)."""
    plot_ap_per_seed(
        {v: [by[v, s][1]["bbox"]["AP"] for s in seeds] for v in variants},
        os.path.join(output, "ap_per_seed.png"),
        reference=("teacher", teacher_ap),
    )
    plot_losses(
        {
            "teacher": tcfg.OUTPUT_DIR,
            **{f"{v} seed {seeds[0]}": by[v, seeds[0]][0].OUTPUT_DIR for v in variants},
        },
        os.path.join(output, "losses.png"),
    )
    draw_detections(
        models["student R-18-FPN"][0],
        models["teacher R-50-FPN"][1],
        models["student R-18-FPN"][1],
        records[:3],
        os.path.join(output, "detections.png"),
    )


# ----------------------------------------------------------------------------------------------
# stage 6: report


def write_report(report: dict, output: str) -> str:
    """report.json and report.md; returns the markdown that is also printed."""
    seeds = report["seeds"]
    lines = seed_table(report["variants"], seeds)
    t = report["teacher"]
    lines.append(f"| teacher R-50-FPN | {fmt(t['ap'])} (one model) |" + " |" * (len(seeds) + 1))
    noise = report.get("evaluation_noise")
    noise_md = ""
    if noise:
        noise_md = (
            f"Evaluation noise (bootstrap over the {noise['num_images']} {report['split']} images, "
            f"{noise['resamples']} resamples, seed {seeds[0]}): sd of one model's AP "
            f"{fmt(noise['sd_ap'])}; sd of the paired difference DKD - plain "
            f"{fmt(noise['sd_diff'])} AP (seed-to-seed sd of that difference: "
            f"{fmt(report['differences']['DKD - plain']['sd'])}).\n\n"
        )
    cost = ["| model | parameters | train s/iter | infer ms/img |", "|---|---|---|---|"]
    for name, c in report["cost"].items():
        cost.append(
            f"| {name} | {c['parameters'] / 1e6:.2f}M | {fmt(c['train_s_per_iter'], '.3f')} "
            f"| {fmt(c['inference_ms'], '.1f')} |"
        )
    body = (
        f"COCO box AP (percent) on the **{report['split']}** split "
        f"({report['num_eval_images']} images), students R-18-FPN, teacher R-50-FPN.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(difference_table(report["differences"]))
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


def run(args) -> dict:
    """The whole pipeline, stage after stage; returns the report (also written to
    ``args.output``)."""
    size = QUICK if args.quick else FULL
    start = time.time()
    output, seeds = args.output, list(range(args.seeds))
    os.makedirs(output, exist_ok=True)
    for name in ("detectron2", "dkd_det"):
        setup_logger(output=os.path.join(output, "log.txt"), name=name)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))

    prepare_data(args.data, size)
    pretrain_backbones(output, size)
    tcfg, teacher = train_teacher(args, size)
    variant_list = VARIANTS + ([REVIEWKD] if args.reviewkd else [])
    by = train_students(args, size, variant_list, seeds)

    say("5/6 statistics, evaluation noise, inference time and pictures")
    variants = [v for v, _ in variant_list]
    gt_json = MetadataCatalog.get(tcfg.DATASETS.TEST[0]).json_file
    stats = compare(by, variants, seeds, teacher["bbox"]["AP"], gt_json, args.bootstrap)
    records = DatasetCatalog.get(tcfg.DATASETS.TEST[0])
    models = trained_models(tcfg, by["DKD", seeds[0]][0])
    cost = measure_cost(models, by, teacher, variants, seeds, records)
    draw_pictures(output, by, variants, seeds, teacher["bbox"]["AP"], tcfg, models, records)

    say("6/6 report")
    report = {
        "quick": args.quick,
        "split": args.eval_split,
        "num_eval_images": len(records),
        "seeds": seeds,
        "settings": {"student_opts": list(args.opts), "teacher_opts": list(args.teacher_opts)},
        "teacher": {
            "ap": teacher["bbox"]["AP"],
            "bbox": teacher["bbox"],
            "evaluator_output": results_file(tcfg),
        },
        "variants": stats["variants"],
        "runs": [
            {
                "variant": v,
                "seed": s,
                "config": os.path.relpath(os.path.join(CONFIGS, c), ROOT),
                "bbox": by[v, s][1]["bbox"],
                "train_s_per_iter": by[v, s][1]["train_s_per_iter"],
                "evaluator_output": results_file(by[v, s][0]),
            }
            for s in seeds
            for v, c in variant_list
        ],
        **{k: stats[k] for k in ("differences", "evaluation_noise", "verdict")},
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
