#!/usr/bin/env python
"""What distillation costs: training-step time and memory of the plain student, KD, DKD and
DKD+ReviewKD (DKD plus ReviewKD's feature term on p2..p6), the teacher's forward alone,
inference latency, and the DKD loss itself.

    python tools/benchmark.py                 # configs/COCO pairs at a CPU-sized default
    python tools/benchmark.py --device cuda --amp
    python tools/benchmark.py --toy           # seconds; what the tests run
    python tools/benchmark.py --deploy --size 800 --pairs R101-R18   # deployment latency

--deploy measures inference instead (batch 1): the teacher and the student in PyTorch, the
student exported to TorchScript and to ONNX Runtime (checked against PyTorch first).

Models have random weights (the teacher's are saved and loaded through the real strict
loading path); inputs are random images with a few boxes, the same for every variant.
Random weights make the RPN's NMS keep an arbitrary number of boxes (a few for one model, a
thousand for another), which would price the ROI heads arbitrarily: the benchmark turns RPN
NMS off, so that every model processes exactly POST_NMS_TOPK proposals, as trained models
about do. Memory is the peak of tensor memory during one step: ``torch.cuda.max_memory_allocated``
on a GPU; on the CPU, the running peak of the allocations torch's profiler records.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from dkd_det.config import get_dkd_cfg, student_cfg
from dkd_det.export import (
    DeployedModel,
    MissingDeployExtra,
    export_deployable,
    pytorch_detections,
)
from dkd_det.losses import dkd_loss
from dkd_det.modeling import get_teacher_cfg

# The configs are the checkout's: this script lives in its tools/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = {
    "R101-R18": "configs/COCO/dkd_r101_r18.yaml",
    "R101-R50": "configs/COCO/dkd_r101_r50.yaml",
    "R50-MV2": "configs/COCO/dkd_r50_mv2.yaml",
}
# Toy size shrinks the heads too, so that a whole pair runs in seconds on the CPU.
TOY_OPTS = [
    "MODEL.FPN.OUT_CHANNELS",
    "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    "64",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "200",
    # p6 of one 64-px image is one pixel, on which the ABF modules' batch norm cannot train
    "MODEL.DISTILL.REVIEWKD.NORM",
    "",
]


def naive_dkd_loss(logits_student, logits_teacher, target, alpha=1.0, beta=0.25, temperature=1.0):
    """DKD as the paper's reference code writes it (probabilities, masks, ``log``), for comparison.

    Overflows to inf/NaN for large logits: do not train with it.
    """
    gt = torch.zeros_like(logits_student).scatter_(1, target[:, None], 1).bool()
    other = ~gt
    p_s = F.softmax(logits_student / temperature, dim=1)
    p_t = F.softmax(logits_teacher / temperature, dim=1)

    def binary(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], dim=1)

    tckd = (
        F.kl_div(torch.log(binary(p_s)), binary(p_t), reduction="sum")
        * temperature**2
        / target.shape[0]
    )
    log_p_hat_s = F.log_softmax(logits_student / temperature - 1000.0 * gt, dim=1)
    p_hat_t = F.softmax(logits_teacher / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p_hat_s, p_hat_t, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], None], iters: int, warmup: int, device: str) -> float:
    """Median wall time of ``fn`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def peak_mib(fn: Callable[[], None], device: str) -> float:
    """Peak tensor memory (MiB) allocated while ``fn`` runs, above what was allocated before."""
    if device.startswith("cuda"):
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


def _cfg(config_file: str, opts: List[str]):
    cfg = get_dkd_cfg(os.path.join(ROOT, config_file), opts)
    cfg.freeze()
    return cfg


def _inputs(batch: int, height: int, width: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = 16 + torch.rand(4, 2, generator=g) * torch.tensor([width * 0.35, height * 0.35])
        inst = Instances(
            (height, width),
            gt_boxes=Boxes(torch.cat([xy, xy + wh], 1)),
            gt_classes=torch.randint(0, num_classes, (4,), generator=g),
        )
        image = torch.randint(0, 256, (3, height, width), generator=g).float()
        out.append({"image": image, "instances": inst, "height": height, "width": width})
    return out


def benchmark_pair(config_file: str, args, workdir: str) -> Dict[str, float]:
    """Times and memory of one teacher -> student pair; keys in ms and MiB."""
    opts = [
        "MODEL.WEIGHTS",
        "",
        "MODEL.DEVICE",
        args.device,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        str(args.rois),
        "MODEL.RPN.NMS_THRESH",
        "1.0",
    ] + (TOY_OPTS if args.toy else [])
    teacher_opts = opts + ["MODEL.TEACHER.OPTS", repr(opts)]
    # A random teacher in detectron2's checkpoint format, loaded back through the strict path.
    teacher_file = os.path.join(workdir, "teacher.pth")
    torch.manual_seed(0)
    DetectionCheckpointer(
        build_model(get_teacher_cfg(_cfg(config_file, teacher_opts))), save_dir=workdir
    ).save("teacher")
    teacher_opts += ["MODEL.TEACHER.WEIGHTS", teacher_file]

    torch.manual_seed(0)
    plain = build_model(student_cfg(_cfg(config_file, teacher_opts)))
    models = {"plain": plain}
    for kind in ("KD", "DKD"):
        models[kind.lower()] = build_model(
            _cfg(config_file, teacher_opts + ["MODEL.DISTILL.TERMS", repr([kind])])
        )
        models[kind.lower()].load_state_dict(plain.state_dict())  # the same student weights
    # DKD + ReviewKD: the same student weights; the ABF modules (training only) are its own.
    models["reviewdkd"] = build_model(
        _cfg(config_file, teacher_opts + ["MODEL.DISTILL.TERMS", "['DKD', 'REVIEWKD']"])
    )
    missing = models["reviewdkd"].load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert all(k.startswith("distill_terms.") for k in missing), missing
    cfg = _cfg(config_file, opts)
    height, width = args.size, int(args.size * 4 / 3) // 32 * 32
    inputs = _inputs(args.batch, height, width, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    amp = torch.autocast(args.device.split(":")[0], enabled=args.amp)
    result = {}

    for name, model in models.items():
        model.train()
        # lr 0: the weights stay as built, so every repetition times the same model (HCL
        # against a random teacher's large features would otherwise diverge in a few steps).
        optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9
        )
        scaler = torch.cuda.amp.GradScaler(enabled=args.amp and args.device.startswith("cuda"))

        def step():
            with EventStorage(0), amp:
                losses = model(inputs)
            optimizer.zero_grad()
            scaler.scale(sum(losses.values())).backward()
            scaler.step(optimizer)
            scaler.update()

        result[f"{name}_step_ms"] = median_ms(step, args.iters, args.warmup, args.device)
        result[f"{name}_step_mib"] = peak_mib(step, args.device)

    dkd = models["dkd"]
    with torch.no_grad(), EventStorage(0):  # the boxes the student samples, as in a DKD step
        gt = [x["instances"].to(dkd.device) for x in inputs]
        images = dkd.preprocess_image(inputs)
        proposals, _ = dkd.proposal_generator(images, dkd.backbone(images.tensor), gt)
        boxes = [p.proposal_boxes for p in dkd.roi_heads.label_and_sample_proposals(proposals, gt)]

    def teacher_forward():
        with amp:
            dkd.teacher_logits(dkd.teacher_features(inputs), boxes)

    result["teacher_forward_ms"] = median_ms(teacher_forward, args.iters, args.warmup, args.device)
    result["teacher_forward_mib"] = peak_mib(teacher_forward, args.device)
    one = [{"image": inputs[0]["image"]}]
    for name, model in (("student", plain), ("teacher", dkd.teacher)):
        model.eval()

        @torch.no_grad()
        def infer():
            with amp:
                model(one)

        result[f"{name}_inference_ms"] = median_ms(infer, args.iters, args.warmup, args.device)
    result["dkd_over_plain"] = result["dkd_step_ms"] / result["plain_step_ms"]
    result["reviewdkd_over_dkd"] = result["reviewdkd_step_ms"] / result["dkd_step_ms"]
    result["dkd_over_plain_plus_teacher"] = result["dkd_step_ms"] / (
        result["plain_step_ms"] + result["teacher_forward_ms"]
    )
    result["kd_over_plain_plus_teacher"] = result["kd_step_ms"] / (
        result["plain_step_ms"] + result["teacher_forward_ms"]
    )
    result["teacher_over_student_inference"] = (
        result["teacher_inference_ms"] / result["student_inference_ms"]
    )
    return result


def benchmark_loss(args) -> Dict[str, float]:
    """dkd_loss vs :func:`naive_dkd_loss`, forward + backward at detection size
    (``images x rois`` regions, 81 classes); ms and MiB."""
    n = 2 * 64 if args.toy else 16 * 512
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(n, 81, generator=g).to(args.device) * 3
    target = torch.randint(0, 81, (n,), generator=g).to(args.device)
    out = {"regions": n}
    for name, fn in (("dkd_loss", dkd_loss), ("naive", naive_dkd_loss)):
        z_s = (torch.randn(n, 81, generator=g) * 3).to(args.device).requires_grad_(True)

        def step():
            fn(z_s, z_t, target).backward()

        step()  # allocates z_s.grad once, outside the measurements
        out[f"{name}_ms"] = median_ms(step, max(args.iters, 20), 3, args.device)
        out[f"{name}_mib"] = peak_mib(step, args.device)
    out["time_ratio"] = out["dkd_loss_ms"] / out["naive_ms"]
    out["memory_ratio"] = out["dkd_loss_mib"] / out["naive_mib"]
    return out


def format_table(results: Dict[str, Dict[str, float]], loss: Optional[Dict[str, float]]) -> str:
    """The pairs as a markdown table (ms, MiB, ratios), then the loss comparison."""
    cols = [
        ("plain step ms", "plain_step_ms"),
        ("KD step ms", "kd_step_ms"),
        ("DKD step ms", "dkd_step_ms"),
        ("DKD+ReviewKD step ms", "reviewdkd_step_ms"),
        ("DKD+ReviewKD/DKD", "reviewdkd_over_dkd"),
        ("teacher fwd ms", "teacher_forward_ms"),
        ("DKD/plain", "dkd_over_plain"),
        ("DKD/(plain+teacher)", "dkd_over_plain_plus_teacher"),
        ("KD/(plain+teacher)", "kd_over_plain_plus_teacher"),
        ("plain MiB", "plain_step_mib"),
        ("DKD MiB", "dkd_step_mib"),
        ("DKD+ReviewKD MiB", "reviewdkd_step_mib"),
        ("teacher fwd MiB", "teacher_forward_mib"),
        ("student infer ms", "student_inference_ms"),
        ("teacher infer ms", "teacher_inference_ms"),
        ("teacher/student infer", "teacher_over_student_inference"),
    ]
    lines = ["| pair | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for pair, r in results.items():
        lines.append(
            f"| {pair} | "
            + " | ".join(f"{r[k]:.2f}" if "over" in k else f"{r[k]:.1f}" for _, k in cols)
            + " |"
        )
    if loss:
        lines += [
            "",
            f"| loss, fwd+bwd, {loss['regions']} regions x 81 classes | ms | MiB |",
            "|---|---|---|",
            f"| dkd_loss (log space, closed-form backward) | {loss['dkd_loss_ms']:.2f} "
            f"| {loss['dkd_loss_mib']:.2f} |",
            f"| naive (softmax, masks, log) | {loss['naive_ms']:.2f} | {loss['naive_mib']:.2f} |",
            f"| ratio | {loss['time_ratio']:.2f} | {loss['memory_ratio']:.2f} |",
        ]
    return "\n".join(lines)


def peak_rss_mib(fn: Callable[[], None], device: str) -> float:
    """Peak resident memory (MiB) of the process while ``fn`` runs, above what was resident
    before: unlike torch's profiler it also sees ONNX Runtime's allocations. Linux: resets
    the high-water mark through /proc/self/clear_refs; elsewhere, and on a GPU,
    :func:`peak_mib` (tensor memory)."""
    if device.startswith("cuda") or not os.path.exists("/proc/self/clear_refs"):
        return peak_mib(fn, device)

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    fn()
    return (status("VmHWM:") - before) / 1024


def benchmark_deploy(pair: str, args, workdir: str) -> List[Dict]:
    """Inference of one image (batch 1): the teacher and the student in PyTorch, the student as
    traced TorchScript and in ONNX Runtime, each exported and checked against the PyTorch
    student first. Rows: {"model", "runtime", "ms", "mib", "note"} (ms None: not run)."""
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "MODEL.RPN.NMS_THRESH", "1.0"]
    opts += TOY_OPTS if args.toy else []
    cfg = _cfg(PAIRS[pair], opts + ["MODEL.TEACHER.OPTS", repr(opts)])
    torch.manual_seed(0)
    teacher = build_model(get_teacher_cfg(cfg)).eval()
    scfg = student_cfg(cfg)
    student = build_model(scfg).eval()
    height, width = args.size, int(args.size * 4 / 3) // 32 * 32
    image = _inputs(1, height, width, cfg.MODEL.ROI_HEADS.NUM_CLASSES)[0]["image"]
    teacher_name, student_name = pair.split("-")
    runs = [(teacher_name, "PyTorch", teacher, ""), (student_name, "PyTorch", student, "")]
    for fmt, runtime in (("torchscript", "TorchScript (trace)"), ("onnx", "ONNX Runtime")):
        folder = os.path.join(workdir, fmt)
        try:
            export_deployable(scfg, student, folder, fmt, [("benchmark image", image)])
            deployed = DeployedModel(folder, device=args.device)
        except (MissingDeployExtra, ValueError) as e:  # no onnxruntime, no CUDA provider
            runs.append((student_name, runtime, None, str(e)))
            continue
        if fmt == "onnx":
            runtime += f" (opset {deployed.info['opset']})"
        runs.append((student_name, runtime, deployed, ""))
    rows = []
    for name, runtime, model, note in runs:
        row = {"model": name, "runtime": runtime, "ms": None, "mib": None, "note": note}
        if model is not None:
            if isinstance(model, torch.nn.Module):

                def infer(model=model):
                    pytorch_detections(model, image)

            else:

                def infer(model=model):
                    model(image)

            # Memory of the first call: ONNX Runtime's arena (like torch's CUDA cache) keeps
            # what it allocated, so later calls would show only what is not reused.
            row["mib"] = peak_rss_mib(infer, args.device)
            row["ms"] = median_ms(infer, args.iters, args.warmup, args.device)
        rows.append(row)
        print(f"[benchmark] {name} {runtime}: {row['ms'] or note}", flush=True)
    return rows


def format_deploy_table(results: Dict[str, List[Dict]]) -> str:
    """--deploy's rows as a markdown table; speed-up relative to the pair's teacher."""
    lines = [
        "| model | runtime | median ms | speed-up vs teacher | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for rows in results.values():
        teacher_ms = rows[0]["ms"]
        for r in rows:
            if r["ms"] is None:
                lines.append(f"| {r['model']} | {r['runtime']} | n/a: {r['note']} | | |")
            else:
                lines.append(
                    f"| {r['model']} | {r['runtime']} | {r['ms']:.0f} | "
                    f"{teacher_ms / r['ms']:.2f}x | {r['mib']:.0f} |"
                )
    return "\n".join(lines)


def main_deploy(args) -> dict:
    """--deploy: :func:`benchmark_deploy` for every pair; prints the table, writes the JSON."""
    results = {}
    for pair in args.pairs:
        print(f"[benchmark] deploy {pair} ({PAIRS[pair]})", flush=True)
        with tempfile.TemporaryDirectory() as workdir:
            results[pair] = benchmark_deploy(pair, args, workdir)
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    memory = "GPU tensor memory" if args.device.startswith("cuda") else "process RSS"
    memory += " of the first call"
    header = (
        f"device: {device}; torch {torch.__version__}; batch 1, a "
        f"{args.size}x{int(args.size * 4 / 3) // 32 * 32} image; random weights, RPN NMS off; "
        f"median of {args.iters} after {args.warmup} warm-up; peak MiB: {memory} above before"
    )
    print("\n" + header + "\n\n" + format_deploy_table(results))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    report = {
        "settings": {**vars(args), "device_name": device, "torch": torch.__version__},
        "deploy": results,
    }
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwritten: {args.output}")
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=[p for p, f in PAIRS.items() if os.path.isfile(os.path.join(ROOT, f))],
        choices=list(PAIRS),
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="autocast (GPU) for every forward")
    parser.add_argument(
        "--size", type=int, default=320, help="image height in pixels (width 4/3 of it)"
    )
    parser.add_argument("--batch", type=int, default=2, help="images per training step")
    parser.add_argument(
        "--rois",
        type=int,
        default=512,
        help="sampled regions per image (ROI_HEADS.BATCH_SIZE_PER_IMAGE)",
    )
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--toy", action="store_true", help="tiny sizes, 1 iteration: checks that it runs"
    )
    parser.add_argument("--output", default="outputs/benchmark/benchmark.json")
    parser.add_argument(
        "--deploy",
        action="store_true",
        help="inference latency and memory instead: teacher, student, student TorchScript and "
        "ONNX Runtime (batch 1)",
    )
    args = parser.parse_args(argv)
    if args.toy:
        args.size, args.batch, args.rois, args.iters, args.warmup = 64, 1, 32, 1, 1
    if args.deploy:
        return main_deploy(args)
    results = {}
    for pair in args.pairs:
        print(f"[benchmark] {pair} ({PAIRS[pair]})", flush=True)
        with tempfile.TemporaryDirectory() as workdir:
            results[pair] = benchmark_pair(PAIRS[pair], args, workdir)
    loss = benchmark_loss(args)
    table = format_table(results, loss)
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    header = (
        f"device: {device}; torch {torch.__version__}; AMP {'on' if args.amp else 'off'}; "
        f"{args.batch} images of {args.size}x{int(args.size * 4 / 3) // 32 * 32}, "
        f"{args.rois} ROIs/image; median of {args.iters} after {args.warmup} warm-up"
    )
    print("\n" + header + "\n\n" + table)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    report = {
        "settings": {**vars(args), "device_name": device, "torch": torch.__version__},
        "pairs": results,
        "loss": loss,
    }
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwritten: {args.output}")
    return report


if __name__ == "__main__":
    main()
