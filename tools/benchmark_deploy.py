#!/usr/bin/env python
"""Deployment latency: inference of one image (batch 1) by the teacher and the student in
PyTorch, and by the student exported to TorchScript (trace) and to ONNX Runtime, each export
checked against the PyTorch student first.

    python tools/benchmark_deploy.py --size 800 --pairs R101-R18
    python tools/benchmark_deploy.py --device cuda
    python tools/benchmark_deploy.py --toy    # seconds; what the tests run

An export that fails its check is an error (DeployCheckError), never a row; only a missing
optional extra (onnx, onnxruntime, or onnxruntime's CUDA provider on a GPU) gives an "n/a" row.

The models run once per round, for --warmup + --iters rounds, in an order that rotates each
round: ms is the median [quartiles] over the kept rounds, the speed-up the median
[quartiles] of the per-round ratios teacher / model. Peak memory is that of the first call
(ONNX Runtime's arena, like torch's CUDA cache, keeps what it allocated, so later calls would
show only what is not reused): on the CPU the process's resident memory above before, on a
GPU torch's tensor memory. Random weights with calibrated norm statistics, RPN NMS off, and
the same number of (box, class) candidates into every model's NMS (--candidates), as
tools/benchmark.py.
"""

import argparse
import json
import os
import tempfile
from typing import Dict, List, Optional

import torch
from detectron2.modeling import build_model

from dkd_det.config import get_dkd_cfg, student_cfg
from dkd_det.evaluation import (
    calibrate_norms,
    device_description,
    equalise_candidates,
    interleaved_ms,
    peak_rss_mib,
    random_inputs,
    ratio_spread,
    spread,
)
from dkd_det.export import (
    DeployedModel,
    MissingDeployExtra,
    export_deployable,
    pytorch_detections,
    require_onnx,
)
from dkd_det.modeling import get_teacher_cfg

# The configs are the checkout's: this script lives in its tools/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = {
    "R101-R18": "configs/COCO/dkd_r101_r18.yaml",
    "R101-R50": "configs/COCO/dkd_r101_r50.yaml",
    "R50-MV2": "configs/COCO/dkd_r50_mv2.yaml",
}
TOY_OPTS = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64"]
EXPORTS = [("torchscript", "TorchScript (trace)"), ("onnx", "ONNX Runtime")]


def unavailable(fmt: str, device: str) -> Optional[str]:
    """Why ``fmt`` cannot run here, if an optional extra is missing: onnx or onnxruntime, or
    on a GPU onnxruntime's CUDAExecutionProvider; None when it can."""
    if fmt != "onnx":
        return None
    try:
        _, ort = require_onnx()
    except MissingDeployExtra as e:
        return str(e)
    if device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu"
    return None


def build_pair(pair: str, args, image: torch.Tensor):
    """(student cfg, teacher, student): random, norms calibrated on ``image``, in eval mode,
    with ``args.candidates`` NMS candidates each on it; and what their inference processes."""
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "MODEL.RPN.NMS_THRESH", "1.0"]
    opts += TOY_OPTS if args.toy else []
    cfg = get_dkd_cfg(os.path.join(ROOT, PAIRS[pair]), opts + ["MODEL.TEACHER.OPTS", repr(opts)])
    cfg.freeze()
    scfg = student_cfg(cfg)
    torch.manual_seed(0)
    teacher = build_model(get_teacher_cfg(cfg)).eval()
    student = build_model(scfg).eval()
    inference = {}
    for name, model in (("teacher", teacher), ("student", student)):
        calibrate_norms(model, [{"image": image}])
        inference[name] = equalise_candidates(model, {"image": image}, args.candidates)
    # The export's check and deploy.json read the threshold the student now has.
    scfg = scfg.clone()
    scfg.defrost()
    scfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = inference["student"]["threshold"]
    scfg.freeze()
    return scfg, teacher, student, inference


def benchmark_deploy(pair: str, args, workdir: str) -> Dict:
    """Rows ``{"model", "runtime", "ms", "speedup", "mib", "note"}`` of one pair (ms and
    speed-up: :func:`spread` over the rounds; None with the note saying which extra is
    missing) and ``inference``: what the PyTorch models processed."""
    height, width = args.size, int(args.size * 4 / 3) // 32 * 32
    image = random_inputs(1, height, width, num_classes=1)[0]["image"]  # its boxes: unused
    scfg, teacher, student, inference = build_pair(pair, args, image)
    teacher_name, student_name = pair.split("-")
    runs = [(teacher_name, "PyTorch", teacher, ""), (student_name, "PyTorch", student, "")]
    for fmt, runtime in EXPORTS:
        missing = unavailable(fmt, args.device)
        if missing:
            runs.append((student_name, runtime, None, missing))
            continue
        folder = os.path.join(workdir, fmt)
        export_deployable(scfg, student, folder, fmt, [("benchmark image", image)])
        deployed = DeployedModel(folder, device=args.device)
        if fmt == "onnx":
            runtime += f" (opset {deployed.info['opset']})"
        runs.append((student_name, runtime, deployed, ""))
    fns = {}
    rows = []
    for i, (name, runtime, model, note) in enumerate(runs):
        rows.append({"model": name, "runtime": runtime, "ms": None, "speedup": None})
        rows[-1].update(mib=None, note=note)
        if model is None:
            continue
        if isinstance(model, torch.nn.Module):
            fns[i] = lambda model=model: pytorch_detections(model, image)
        else:
            fns[i] = lambda model=model: model(image)
        rows[-1]["mib"] = peak_rss_mib(fns[i], args.device)  # the first call, see the docstring
    times = interleaved_ms(fns, args.iters, args.warmup, args.device)
    for i, t in times.items():
        rows[i]["ms"] = spread(t)
        rows[i]["speedup"] = ratio_spread(times[0], t)
        print(
            f"[benchmark_deploy] {rows[i]['model']} {rows[i]['runtime']}: "
            f"{rows[i]['ms']['median']:.1f} ms",
            flush=True,
        )
    return {"rows": rows, "inference": inference}


def format_table(results: Dict[str, Dict]) -> str:
    """The rows of every pair as a markdown table: median [quartiles] ms, speed-up relative to
    the pair's teacher, peak MiB; then what each PyTorch model's inference processed."""
    lines = [
        "| model | runtime | ms | speed-up vs teacher | peak MiB |",
        "|---|---|---|---|---|",
    ]
    notes: List[str] = []
    for pair, result in results.items():
        for r in result["rows"]:
            if r["ms"] is None:
                lines.append(f"| {r['model']} | {r['runtime']} | n/a: {r['note']} | | |")
                continue
            ms, up = r["ms"], r["speedup"]
            lines.append(
                f"| {r['model']} | {r['runtime']} | {ms['median']:.0f} [{ms['q1']:.0f}, "
                f"{ms['q3']:.0f}] | {up['median']:.2f}x [{up['q1']:.2f}, {up['q3']:.2f}] "
                f"| {r['mib']:.0f} |"
            )
        notes.append(
            f"{pair}, per image: "
            + "; ".join(
                f"{name} {i['proposals']} proposals, {i['candidates']} NMS candidates"
                for name, i in result["inference"].items()
            )
        )
    return "\n".join(lines + [""] + notes)


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
    parser.add_argument(
        "--size", type=int, default=320, help="image height in pixels (width 4/3 of it)"
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=1000,
        help="(box, class) pairs each model passes into its per-class NMS",
    )
    parser.add_argument("--iters", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="rounds run first, not kept")
    parser.add_argument(
        "--toy", action="store_true", help="tiny sizes, 3 rounds: checks that it runs"
    )
    parser.add_argument("--output", default="outputs/benchmark/deploy.json")
    args = parser.parse_args(argv)
    if args.toy:
        args.size, args.iters, args.warmup = 64, 3, 1
    results = {}
    for pair in args.pairs:
        print(f"[benchmark_deploy] {pair} ({PAIRS[pair]})", flush=True)
        with tempfile.TemporaryDirectory() as workdir:
            results[pair] = benchmark_deploy(pair, args, workdir)
    device = device_description(args.device)
    memory = "GPU tensor memory" if args.device.startswith("cuda") else "process RSS"
    header = (
        f"device: {device}; torch {torch.__version__}; batch 1, a "
        f"{args.size}x{int(args.size * 4 / 3) // 32 * 32} image; random weights, norms "
        f"calibrated, RPN NMS off; {args.iters} interleaved rounds after {args.warmup} warm-up; "
        "ms: median [quartiles]; speed-up: median [quartiles] of the per-round ratios; "
        f"peak MiB: {memory} of the first call above before"
    )
    print("\n" + header + "\n\n" + format_table(results))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    report = {
        "settings": {**vars(args), "device_name": device, "torch": torch.__version__},
        "deploy": results,
    }
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwritten: {args.output}")
    return report


if __name__ == "__main__":
    main()
