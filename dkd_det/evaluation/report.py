"""The report of a paired-seed comparison: statistics of every variant and of its paired
differences, per COCO task (``bbox``, ``segm``), and the markdown that shows them."""

import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from .stats import describe, mean_sd, paired_difference
from .tables import difference_table, fmt, seed_table

__all__ = ["TASK_NAMES", "summarise", "comparison_markdown", "cost_by_variant", "run_table"]

TASK_NAMES = {"bbox": "box", "segm": "mask"}
_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def summarise(
    metrics: Dict[Tuple[str, int], Dict[str, Dict[str, float]]],
    variants: Sequence[str],
    seeds: Sequence[int],
    task: str = "bbox",
    plain: str = "plain",
    reference: Optional[str] = "DKD",
) -> dict:
    """The statistics of one task of a comparison.

    Args:
        metrics: {(variant, seed): {task: {metric: value}}}, COCO metrics in percent.
        variants: in report order; ``plain`` among them.
        reference: the variant every other one is also compared with (None or absent: only
            against ``plain``).

    Returns:
        ``{"variants": {v: {"ap": [AP per seed], "mean", "sd", "n", "metrics": {metric:
        {"mean", "sd", "n"}}}}, "differences": {"a - b": paired_difference}, "verdict":
        [one sentence per difference]}``.
    """
    per_variant = {}
    for v in variants:
        runs = [metrics[v, s][task] for s in seeds]
        per_variant[v] = {
            "ap": [r["AP"] for r in runs],
            **mean_sd([r["AP"] for r in runs]),
            "metrics": {m: mean_sd([r[m] for r in runs]) for m in _METRICS if m in runs[0]},
        }
    pairs = [(v, plain) for v in variants if v != plain]
    if reference in per_variant:
        pairs += [(v, reference) for v in variants if v not in (plain, reference)]
    differences = {
        f"{a} - {b}": paired_difference(per_variant[a]["ap"], per_variant[b]["ap"])
        for a, b in pairs
    }
    verdict = [describe(*name.split(" - "), d) for name, d in differences.items()]
    return {"variants": per_variant, "differences": differences, "verdict": verdict}


def _mean_sd(s: Optional[dict]) -> str:
    if not s or s["mean"] != s["mean"]:
        return "-"
    return fmt(s["mean"]) + (f" ± {fmt(s['sd'])}" if s["sd"] == s["sd"] else "")


def _cost_table(report: dict) -> List[str]:
    lines = [
        "| variant | runs | train s/iter (median) | wall per run (mean, s) |",
        "|---|---|---|---|",
    ]
    for name, c in report["cost"].items():
        lines.append(
            f"| {name} | {c['runs']} | {fmt(c['train_s_per_iter'], '.3f')} | "
            f"{fmt(c['wall_seconds'], '.0f')} |"
        )
    return lines


def comparison_markdown(report: dict) -> str:
    """The body of ``report.md`` for a report written by ``tools/compare.py``: per task the AP
    of every seed (and the teacher), the means of every COCO metric, the paired differences
    with 95% intervals and the verdict; the evaluation noise; the cost of every variant."""
    seeds, split, n = report["seeds"], report["split"], report["num_eval_images"]
    out = []
    for task, stats in report["tasks"].items():
        what = TASK_NAMES.get(task, task)
        lines = seed_table(stats["variants"], seeds)
        teacher = (report.get("teacher") or {}).get("metrics", {}).get(task)
        if teacher:
            cells = " |" * (len(seeds) + 1)
            lines.append(f"| teacher | {fmt(teacher['AP'])} (one model) |{cells}")
        means = ["| variant | " + " | ".join(_METRICS) + " |", "|---|" + "---|" * len(_METRICS)]
        for v, s in stats["variants"].items():
            cells = [_mean_sd(s["metrics"].get(m)) for m in _METRICS]
            means.append(f"| {v} | " + " | ".join(cells) + " |")
        out += [
            f"COCO {what} AP (percent) on the **{split}** split ({n} images), "
            f"{len(seeds)} paired seeds.\n",
            *lines,
            "",
            f"Mean ± sd over the seeds, every COCO {what} metric:\n",
            *means,
            "",
            *difference_table(stats["differences"]),
            "",
            f"**Verdict ({what} AP).** " + " ".join(stats["verdict"]),
            "",
        ]
    noise = report.get("evaluation_noise")
    if noise:
        a, b = noise["pair"]
        seed_sd = report["tasks"]["bbox"]["differences"][f"{a} - {b}"]["sd"]
        out += [
            f"Evaluation noise (bootstrap over the {noise['num_images']} {split} images, "
            f"{noise['resamples']} resamples, seed {seeds[0]}): sd of one model's box AP "
            f"{fmt(noise['sd_ap'])}; sd of the paired difference {a} - {b} "
            f"{fmt(noise['sd_diff'])} AP (seed-to-seed sd of that difference: {fmt(seed_sd)}).",
            "",
        ]
    out += _cost_table(report)
    return "\n".join(out) + "\n"


def run_table(report: dict) -> List[str]:
    """Lines of a markdown table: every run of the report with every COCO metric of every
    task (``bbox AP``, ..., ``segm APl``), its s/iter and wall time."""
    tasks = list(report["tasks"])
    head = [f"{TASK_NAMES.get(t, t)} {m}" for t in tasks for m in _METRICS]
    lines = [
        "| run | " + " | ".join(head) + " | s/iter | wall s |",
        "|---|" + "---|" * (len(head) + 2),
    ]
    for r in report["runs"]:
        cells = [fmt(r["metrics"][t].get(m)) for t in tasks for m in _METRICS]
        cells += [fmt(r["train_s_per_iter"], ".3f"), fmt(r["wall_seconds"], ".0f")]
        lines.append(f"| {r['variant']} seed {r['seed']} | " + " | ".join(cells) + " |")
    return lines


def cost_by_variant(runs: Sequence[dict]) -> Dict[str, dict]:
    """{variant: {"runs", "train_s_per_iter" (median over its runs), "wall_seconds" (mean
    wall time of a run, training and final evaluation)}} of the report's ``runs``."""
    out: Dict[str, dict] = {}
    for r in runs:
        out.setdefault(r["variant"], []).append(r)
    return {
        v: {
            "runs": len(rs),
            "train_s_per_iter": statistics.median(r["train_s_per_iter"] for r in rs),
            "wall_seconds": statistics.mean(r["wall_seconds"] for r in rs),
        }
        for v, rs in out.items()
    }
