#!/usr/bin/env python
"""The embedded benchmark: data -> teacher -> students (plain, KD, DKD) -> COCO AP -> report.

    python tools/synthetic_benchmark.py            # what `make demo` runs (~20 min, 2-core CPU)
    python tools/synthetic_benchmark.py --quick    # the same pipeline at toy size (~1 min)

Writes into ``--output`` (default outputs/demo, or outputs/demo_quick with --quick):
report.md, report.json, losses.png, detections.png, and one folder per model with
detectron2's usual training outputs (model_final.pth, metrics.json, inference/).
"""

import argparse
import json
import logging
import os
import statistics
import time
from typing import Dict, List

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from dkd_det.config import get_dkd_cfg
from dkd_det.data import check_datasets, register_coco_format
from dkd_det.data.synthetic import COLOURS, class_names, generate
from dkd_det.engine import Trainer, load_student

# The configs are the checkout's: this script lives in its tools/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "Synthetic")
# (name in the report, config file); the teacher comes first: the students need it.
MODELS = [
    ("teacher R-50-FPN", "teacher_r50_fpn.yaml"),
    ("student R-18-FPN", "student_r18_fpn.yaml"),
    ("KD R-50 -> R-18", "kd_r50_r18.yaml"),
    ("DKD R-50 -> R-18", "dkd_r50_r18.yaml"),
]
FULL = dict(num_train=400, num_val=100, image_size=128, overrides=[])
# Toy size: same code path, a few iterations each; numbers are meaningless.
QUICK = dict(
    num_train=16,
    num_val=8,
    image_size=96,
    overrides=[
        "SOLVER.MAX_ITER",
        "6",
        "SOLVER.STEPS",
        "()",
        "SOLVER.WARMUP_ITERS",
        "0",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.BASE_LR",
        "0.005",
        "INPUT.MIN_SIZE_TRAIN",
        "(96,)",
        "INPUT.MAX_SIZE_TRAIN",
        "96",
        "INPUT.MIN_SIZE_TEST",
        "96",
        "INPUT.MAX_SIZE_TEST",
        "96",
        "DATALOADER.NUM_WORKERS",
        "0",
    ],
)
logger = logging.getLogger("dkd_det.synthetic_benchmark")


def _say(msg: str) -> None:
    print(f"[synthetic_benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_cfg(config: str, output: str, data_dir: str, overrides: List[str]):
    """A frozen config for one model of the demo, its paths moved under ``output``/``data_dir``."""
    name = os.path.splitext(config)[0]
    cfg = get_dkd_cfg(
        os.path.join(CONFIGS, config),
        [
            "OUTPUT_DIR",
            os.path.join(output, name),
            "DATASETS.COCO_FORMAT",
            repr(
                [
                    (
                        f"synthetic_{s}",
                        os.path.join(data_dir, f"{s}.json"),
                        os.path.join(data_dir, s),
                    )
                    for s in ("train", "val")
                ]
            ),
            "MODEL.TEACHER.CONFIG_FILE",
            os.path.join(CONFIGS, MODELS[0][1]),
            "MODEL.TEACHER.WEIGHTS",
            os.path.join(output, os.path.splitext(MODELS[0][1])[0], "model_final.pth"),
            "MODEL.TEACHER.OPTS",
            repr(overrides),
        ]
        + overrides,
    )
    cfg.freeze()
    register_coco_format(cfg)
    check_datasets(cfg)
    return cfg


def _set_colours(cfg, num_classes: int) -> None:
    """Draw each class in its own colour in detectron2's Visualizer."""
    colours = [COLOURS[c] for _, c in class_names(num_classes)]
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        DatasetCatalog.get(name)  # loads the JSON, which sets thing_classes
        MetadataCatalog.get(name).set(thing_colors=colours)


def train(cfg) -> Dict[str, float]:
    """Train one model with the product's Trainer (as tools/train_net.py does), seeded with
    ``cfg.SEED`` so that reruns give the same model; returns the COCO box AP (percent) of the
    evaluation that detectron2 runs at the end of training."""
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return dict(trainer.train()["bbox"])


def evaluate(cfg) -> Dict[str, float]:
    """COCO box AP (percent) of a trained model on the validation split (COCOEvaluator)."""
    model = load_student(cfg, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    return dict(Trainer.test(cfg, model)["bbox"])


def _inputs(cfg, records):
    for r in records:
        image = utils.read_image(r["file_name"], format=cfg.INPUT.FORMAT)
        yield image, {
            "image": torch.as_tensor(
                np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32
            ),
            "height": r["height"],
            "width": r["width"],
        }


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


def train_seconds_per_iter(output_dir: str) -> float:
    """Median of detectron2's per-iteration training time (s) over all logged windows."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        times = [r["time"] for r in map(json.loads, f) if "time" in r]
    return statistics.median(times) if times else float("nan")


@torch.no_grad()
def draw_detections(
    cfg_teacher, teacher, cfg_student, student, records, path, threshold=0.5
) -> None:
    """Save a grid: one validation image per row, the teacher's detections left and the DKD
    student's right (detectron2's Visualizer, class names and colours of the dataset)."""
    meta = MetadataCatalog.get(cfg_student.DATASETS.TEST[0])
    rows = []
    for image, x in _inputs(cfg_student, records):
        rgb = image if cfg_student.INPUT.FORMAT == "RGB" else image[:, :, ::-1]
        panels = []
        for model in (teacher, student):
            inst = model([x])[0]["instances"].to("cpu")
            inst = inst[inst.scores >= threshold]
            panels.append(
                Visualizer(rgb, meta, scale=3.0).draw_instance_predictions(inst).get_image()
            )
        if not rows:  # a title above each column
            for panel, title in zip(panels, ("teacher", "DKD student")):
                cv2.putText(
                    panel,
                    title,
                    (6, 22),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.7,
                    (255, 255, 255),
                    2,
                    cv2.LINE_AA,
                )
        rows.append(
            np.concatenate(
                [panels[0], np.full((panels[0].shape[0], 8, 3), 255, np.uint8), panels[1]], axis=1
            )
        )
    grid = np.concatenate(rows, axis=0)
    cv2.imwrite(path, grid[:, :, ::-1])


def plot_losses(runs: Dict[str, str], path: str) -> None:
    """Training curves from each model's metrics.json: detection losses and distillation terms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            if key == "distill":
                for k in ("loss_kd", "loss_dkd", "dkd/tckd", "dkd/nckd"):
                    if k in records[0]:
                        ax.plot(it, [r[k] for r in records], marker=".", label=f"{name}: {k}")
            else:
                ax.plot(it, [r[key] for r in records], marker=".", label=name)
    for ax, (_, title) in zip(axes, keys):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(rows: List[dict], output: str, wall_s: float, quick: bool) -> str:
    """report.json and report.md; returns the markdown table. An AP that COCO cannot compute
    (no object of that size) is NaN: null in the JSON, "-" in the table."""
    rows = [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows
    ]
    cols = [
        "model",
        "parameters",
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "train s/iter",
        "infer ms/img",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["model"], f"{r['parameters'] / 1e6:.2f}M"] + [
            "-" if r[k] is None else f"{r[k]:.2f}" for k in cols[2:8]
        ]
        cells += [f"{r['train_s_per_iter']:.3f}", f"{r['inference_ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    by = {r["model"]: r for r in rows}
    plain, kd, dkd, teacher = (by[m[0]]["AP"] for m in (MODELS[1], MODELS[2], MODELS[3], MODELS[0]))
    verdict = (
        f"DKD {'beats' if dkd > plain else 'does NOT beat'} the plain student: "
        f"{dkd:.2f} vs {plain:.2f} AP "
        f"({dkd - plain:+.2f}); KD {kd:.2f} ({kd - plain:+.2f}); teacher {teacher:.2f} "
        f"({teacher - plain:+.2f} over the student)."
    )
    with open(os.path.join(output, "report.json"), "w") as f:
        json.dump(
            {"models": rows, "quick": quick, "wall_seconds": wall_s, "verdict": verdict},
            f,
            indent=2,
        )
    with open(os.path.join(output, "report.md"), "w") as f:
        f.write("# dkd-det demo: synthetic shapes, COCO AP on the validation split\n\n")
        if quick:
            f.write(
                "**QUICK run: toy size, a few iterations: "
                "the numbers only show that the pipeline works.**\n\n"
            )
        f.write(table + "\n\n" + verdict + "\n\n")
        f.write(
            "AP values are pycocotools' COCO box AP (percent) from detectron2's COCOEvaluator; "
            "each model's evaluator output is in `<model>/inference/`. "
            "Training time is detectron2's "
            "median time per iteration; inference is the median latency per image, batch 1, CPU. "
            f"Wall time of the whole pipeline: {wall_s / 60:.1f} min.\n\n"
            "![losses](losses.png)\n\n"
            "![detections: teacher (left), DKD student (right)](detections.png)\n"
        )
    return table + "\n\n" + verdict


def run(output: str, data_dir: str, quick: bool = False, retrain_teacher: bool = False) -> dict:
    """The whole pipeline; returns the report as a dict (also written to ``output``)."""
    size = QUICK if quick else FULL
    start = time.time()
    os.makedirs(output, exist_ok=True)
    setup_logger(output=os.path.join(output, "log.txt"), name="detectron2", abbrev_name="d2")
    setup_logger(output=os.path.join(output, "log.txt"), name="dkd_det")
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    n_stages = 3 + len(MODELS)
    if os.path.isfile(os.path.join(data_dir, "val.json")):
        _say(f"1/{n_stages} data: reusing {data_dir}")
    else:
        _say(
            f"1/{n_stages} data: writing {size['num_train']} + {size['num_val']} "
            f"synthetic images to {data_dir}"
        )
        generate(data_dir, size["num_train"], size["num_val"], image_size=size["image_size"])
    cfgs = {name: build_cfg(config, output, data_dir, size["overrides"]) for name, config in MODELS}
    num_classes = next(iter(cfgs.values())).MODEL.ROI_HEADS.NUM_CLASSES
    _set_colours(next(iter(cfgs.values())), num_classes)

    aps = {}
    for i, (name, _) in enumerate(MODELS):
        cfg = cfgs[name]
        final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if i == 0 and os.path.isfile(final) and not retrain_teacher:
            _say(f"{2 + i}/{n_stages} {name}: reusing {final}")
            aps[name] = evaluate(cfg)
            continue
        _say(
            f"{2 + i}/{n_stages} training {name}: {cfg.SOLVER.MAX_ITER} iterations, "
            f"batch {cfg.SOLVER.IMS_PER_BATCH}"
        )
        t = time.time()
        aps[name] = train(cfg)
        _say(
            f"{name} trained and evaluated in {(time.time() - t) / 60:.1f} min: "
            f"{aps[name]['AP']:.2f} AP"
        )

    _say(f"{2 + len(MODELS)}/{n_stages} timing inference")
    records = DatasetCatalog.get(cfgs[MODELS[0][0]].DATASETS.TEST[0])
    rows, models = [], {}
    for name, _ in MODELS:
        cfg = cfgs[name]
        ap = aps[name]
        models[name] = load_student(cfg, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
        rows.append(
            {
                "model": name,
                "config": os.path.relpath(os.path.join(CONFIGS, dict(MODELS)[name]), ROOT),
                "parameters": sum(p.numel() for p in models[name].parameters()),
                **{k: ap[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
                "train_s_per_iter": train_seconds_per_iter(cfg.OUTPUT_DIR),
                "inference_ms": inference_ms(cfg, models[name], records[:20]),
                "evaluator_output": os.path.join(
                    cfg.OUTPUT_DIR, "inference", cfg.DATASETS.TEST[0], "coco_instances_results.json"
                ),
            }
        )
    _say(f"{3 + len(MODELS)}/{n_stages} drawing losses.png and detections.png")
    plot_losses(
        {name: cfgs[name].OUTPUT_DIR for name, _ in MODELS}, os.path.join(output, "losses.png")
    )
    teacher, dkd = MODELS[0][0], MODELS[3][0]
    draw_detections(
        cfgs[teacher],
        models[teacher],
        cfgs[dkd],
        models[dkd],
        records[:3],
        os.path.join(output, "detections.png"),
    )
    table = write_report(rows, output, time.time() - start, quick)
    _say(f"done in {(time.time() - start) / 60:.1f} min; report in {output}/report.md\n\n{table}\n")
    with open(os.path.join(output, "report.json")) as f:
        return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="toy size, for tests (~3 min)")
    parser.add_argument("--output", help="default: outputs/demo (outputs/demo_quick with --quick)")
    parser.add_argument(
        "--data", help="default: datasets/synthetic (datasets/synthetic_quick with --quick)"
    )
    parser.add_argument(
        "--retrain-teacher", action="store_true", help="train the teacher even if trained already"
    )
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    run(
        args.output or f"outputs/demo{suffix}",
        args.data or f"datasets/synthetic{suffix}",
        args.quick,
        args.retrain_teacher,
    )


if __name__ == "__main__":
    main()
