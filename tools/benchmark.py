#!/usr/bin/env python
"""What distillation costs: training-step time and memory of the plain student, KD, DKD and
DKD+ReviewKD (DKD plus ReviewKD's feature term on p2..p6), the teacher's forward alone,
inference latency of teacher and student, and the DKD loss itself.

    python tools/benchmark.py                 # configs/COCO pairs at a CPU-sized default
    python tools/benchmark.py --device cuda --amp
    python tools/benchmark.py --toy           # seconds; what the tests run

Deployment latency (TorchScript, ONNX Runtime) is tools/benchmark_deploy.py.

Every measurement runs once per round, for --warmup + --iters rounds, in an order that rotates
each round; times are the median and quartiles over the kept rounds, and each ratio is the
median [quartiles] of its per-round ratios, so that the machine's drift hits both sides.

Models have random weights (the teacher's are saved and loaded through the real strict
loading path), with the backbones' norm statistics calibrated on the inputs
(:func:`dkd_det.evaluation.calibrate_norms`: uncalibrated, a random R-101's features reach
1e7 and its RPN keeps no proposal). Inputs are random images with a few boxes, the same for
every variant. Random weights make the RPN's NMS keep an arbitrary number of boxes: RPN NMS is
off, so every model processes exactly POST_NMS_TOPK proposals, and at inference both models
pass the same number of (box, class) candidates into the per-class NMS (--candidates). Memory
is the peak of tensor memory during one step: ``torch.cuda.max_memory_allocated`` on a GPU; on
the CPU, the running peak of the allocations torch's profiler records.
"""

import argparse
import json
import os
import tempfile
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from dkd_det.config import get_dkd_cfg, student_cfg
from dkd_det.evaluation import (
    calibrate_norms,
    device_description,
    equalise_candidates,
    interleaved_ms,
    peak_mib,
    random_inputs,
    ratio_spread,
    spread,
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
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
    # p6 of one 64-px image is one pixel, on which the ABF modules' batch norm cannot train
    "MODEL.DISTILL.REVIEWKD.NORM", "",
]  # fmt: skip
# (column, measurement) of the time table; the ratios are (column, numerator, denominator).
TIMES = [
    ("plain step", "plain_step"),
    ("KD step", "kd_step"),
    ("DKD step", "dkd_step"),
    ("DKD+ReviewKD step", "reviewdkd_step"),
    ("teacher fwd", "teacher_forward"),
    ("student infer", "student_inference"),
    ("teacher infer", "teacher_inference"),
]
RATIOS = [
    ("DKD/plain", ("dkd_step",), ("plain_step",)),
    ("DKD/(plain+teacher)", ("dkd_step",), ("plain_step", "teacher_forward")),
    ("KD/(plain+teacher)", ("kd_step",), ("plain_step", "teacher_forward")),
    ("DKD+ReviewKD/DKD", ("reviewdkd_step",), ("dkd_step",)),
    ("teacher/student infer", ("teacher_inference",), ("student_inference",)),
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


def _cfg(config_file: str, opts):
    cfg = get_dkd_cfg(os.path.join(ROOT, config_file), opts)
    cfg.freeze()
    return cfg


def build_models(config_file: str, args, workdir: str, inputs) -> Dict[str, torch.nn.Module]:
    """The plain student and the KD, DKD and DKD+ReviewKD models of one pair, all with the
    same student weights and the same teacher (random, norms calibrated on ``inputs``, saved
    in detectron2's format and loaded back through the strict path)."""
    opts = [
        "MODEL.WEIGHTS", "",
        "MODEL.DEVICE", args.device,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", str(args.rois),
        "MODEL.RPN.NMS_THRESH", "1.0",
    ] + (TOY_OPTS if args.toy else [])  # fmt: skip
    opts += ["MODEL.TEACHER.OPTS", repr(opts)]
    torch.manual_seed(0)
    teacher = build_model(get_teacher_cfg(_cfg(config_file, opts)))
    calibrate_norms(teacher, inputs)
    DetectionCheckpointer(teacher, save_dir=workdir).save("teacher")
    opts += ["MODEL.TEACHER.WEIGHTS", os.path.join(workdir, "teacher.pth")]

    torch.manual_seed(0)
    plain = build_model(student_cfg(_cfg(config_file, opts)))
    calibrate_norms(plain, inputs)
    models = {"plain": plain}
    for name, terms in (("kd", "['KD']"), ("dkd", "['DKD']"), ("reviewdkd", "['DKD', 'REVIEWKD']")):
        models[name] = build_model(_cfg(config_file, opts + ["MODEL.DISTILL.TERMS", terms]))
        # The same student weights; ReviewKD's ABF modules (training only) are its own.
        missing = models[name].load_state_dict(plain.state_dict(), strict=False).missing_keys
        assert all(k.startswith("distill_terms.") for k in missing), missing
    return models


def sampled_boxes(dkd: torch.nn.Module, inputs):
    """The boxes the student samples in a DKD training step, as the DKD term receives them
    (``DistillInputs.boxes``, one Boxes per image): one training forward, read by a hook."""
    seen = []
    handle = dkd.distill_terms["dkd"].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    dkd.train()
    try:
        with torch.no_grad(), EventStorage(0):
            dkd(inputs)
    finally:
        handle.remove()
    return seen[0].boxes


def benchmark_pair(config_file: str, args, workdir: str) -> Dict:
    """Times (ms: :func:`spread` over the rounds), peak memory (MiB) and per-round ratios of
    one teacher -> student pair; ``inference``: what each model's inference processed;
    ``boxes``: the sampled boxes the teacher's forward was timed on (all images)."""
    cfg = _cfg(config_file, ["MODEL.WEIGHTS", ""])
    height, width = args.size, int(args.size * 4 / 3) // 32 * 32
    inputs = random_inputs(args.batch, height, width, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    models = build_models(config_file, args, workdir, inputs)
    amp = torch.autocast(args.device.split(":")[0], enabled=args.amp)
    fns = {}
    for name, model in models.items():
        # lr 0: the weights stay as built, so every repetition times the same model (HCL
        # against a random teacher's large features would otherwise diverge in a few steps).
        optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9
        )
        scaler = torch.amp.GradScaler("cuda", enabled=args.amp and args.device.startswith("cuda"))

        def step(model=model, optimizer=optimizer, scaler=scaler):
            model.train()
            with EventStorage(0), amp:
                losses = model(inputs)
            optimizer.zero_grad()
            scaler.scale(sum(losses.values())).backward()
            scaler.step(optimizer)
            scaler.update()

        fns[f"{name}_step"] = step
    dkd, student = models["dkd"], models["plain"]
    boxes = sampled_boxes(dkd, inputs)

    def teacher_forward():
        with amp:
            dkd.teacher_logits(dkd.teacher_features(inputs), boxes)

    fns["teacher_forward"] = teacher_forward
    one = {"image": inputs[0]["image"]}
    inference = {}
    for name, model in (("student", student), ("teacher", dkd.teacher)):
        inference[name] = equalise_candidates(model, one, args.candidates)

        @torch.no_grad()
        def infer(model=model):
            model.eval()
            with amp:
                model([one])

        fns[f"{name}_inference"] = infer
    times = interleaved_ms(fns, args.iters, args.warmup, args.device)
    mib = {name: peak_mib(fns[name], args.device) for name in fns if not name.endswith("inference")}
    ratios = {
        col: ratio_spread(
            [sum(times[k][r] for k in num) for r in range(args.iters)],
            [sum(times[k][r] for k in den) for r in range(args.iters)],
        )
        for col, num, den in RATIOS
    }
    ms = {name: spread(t) for name, t in times.items()}
    num_boxes = sum(len(b) for b in boxes)
    return {"ms": ms, "mib": mib, "ratios": ratios, "inference": inference, "boxes": num_boxes}


def benchmark_loss(args) -> Dict:
    """dkd_loss vs :func:`naive_dkd_loss`, forward + backward at detection size
    (``images x rois`` regions, 81 classes), interleaved; ms (spread), MiB and the ratios."""
    n = 2 * 64 if args.toy else 16 * 512
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(n, 81, generator=g).to(args.device) * 3
    target = torch.randint(0, 81, (n,), generator=g).to(args.device)
    fns = {}
    for name, fn in (("dkd_loss", dkd_loss), ("naive", naive_dkd_loss)):
        z_s = (torch.randn(n, 81, generator=g) * 3).to(args.device).requires_grad_(True)

        def step(fn=fn, z_s=z_s):
            fn(z_s, z_t, target).backward()

        step()  # allocates z_s.grad once, outside the measurements
        fns[name] = step
    times = interleaved_ms(fns, max(args.iters, 20), 3, args.device)
    mib = {name: peak_mib(fn, args.device) for name, fn in fns.items()}
    return {
        "regions": n,
        "ms": {name: spread(t) for name, t in times.items()},
        "mib": mib,
        "time_ratio": ratio_spread(times["dkd_loss"], times["naive"]),
        "memory_ratio": mib["dkd_loss"] / mib["naive"],
    }


def _iqr(s: Dict, spec: str) -> str:
    return f"{s['median']:{spec}} [{s['q1']:{spec}}, {s['q3']:{spec}}]"


def format_tables(results: Dict[str, Dict], loss: Optional[Dict]) -> str:
    """The pairs as markdown tables: times (ms), ratios (median [quartiles]), memory (MiB),
    then the loss comparison."""
    lines = ["| pair | " + " | ".join(f"{c} ms" for c, _ in TIMES) + " |"]
    lines.append("|---" * (len(TIMES) + 1) + "|")
    for pair, r in results.items():
        lines.append(f"| {pair} | " + " | ".join(_iqr(r["ms"][k], ".1f") for _, k in TIMES) + " |")
    lines += ["", "| pair | " + " | ".join(c for c, _, _ in RATIOS) + " |"]
    lines.append("|---" * (len(RATIOS) + 1) + "|")
    for pair, r in results.items():
        cells = [_iqr(r["ratios"][c], ".2f") for c, _, _ in RATIOS]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    mib = [c for c, k in TIMES if not k.endswith("inference")]
    lines += ["", "| pair | " + " | ".join(f"{c} MiB" for c in mib) + " |"]
    lines.append("|---" * (len(mib) + 1) + "|")
    for pair, r in results.items():
        cells = [f"{r['mib'][k]:.1f}" for _, k in TIMES if not k.endswith("inference")]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    lines.append("")
    for pair, r in results.items():
        lines.append(
            f"{pair} inference, per image: "
            + "; ".join(
                f"{name} {i['proposals']} proposals, {i['candidates']} NMS candidates"
                for name, i in r["inference"].items()
            )
        )
    if loss:
        d, naive = loss["ms"]["dkd_loss"], loss["ms"]["naive"]
        lines += [
            "",
            f"| loss, fwd+bwd, {loss['regions']} regions x 81 classes | ms | MiB |",
            "|---|---|---|",
            f"| dkd_loss (log space, closed-form backward) | {_iqr(d, '.2f')} "
            f"| {loss['mib']['dkd_loss']:.2f} |",
            f"| naive (softmax, masks, log) | {_iqr(naive, '.2f')} | {loss['mib']['naive']:.2f} |",
            f"| ratio | {_iqr(loss['time_ratio'], '.2f')} | {loss['memory_ratio']:.2f} |",
        ]
    return "\n".join(lines)


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
    parser.add_argument(
        "--candidates",
        type=int,
        default=1000,
        help="(box, class) pairs each model passes into its per-class NMS at inference",
    )
    parser.add_argument("--iters", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="rounds run first, not kept")
    parser.add_argument(
        "--toy", action="store_true", help="tiny sizes, 3 rounds: checks that it runs"
    )
    parser.add_argument("--output", default="outputs/benchmark/benchmark.json")
    args = parser.parse_args(argv)
    if args.toy:
        args.size, args.batch, args.rois, args.iters, args.warmup = 64, 1, 32, 3, 1
    results = {}
    for pair in args.pairs:
        print(f"[benchmark] {pair} ({PAIRS[pair]})", flush=True)
        with tempfile.TemporaryDirectory() as workdir:
            results[pair] = benchmark_pair(PAIRS[pair], args, workdir)
    loss = benchmark_loss(args)
    device = device_description(args.device)
    header = (
        f"device: {device}; torch {torch.__version__}; AMP {'on' if args.amp else 'off'}; "
        f"{args.batch} images of {args.size}x{int(args.size * 4 / 3) // 32 * 32}, "
        f"{args.rois} ROIs/image; inference: batch 1; random weights, norms calibrated, RPN "
        f"NMS off; {args.iters} interleaved rounds after {args.warmup} warm-up; ms: median "
        "[quartiles]; ratios: median [quartiles] of the per-round ratios"
    )
    print("\n" + header + "\n\n" + format_tables(results, loss))
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
