"""Markdown tables of a comparison over paired seeds: AP of every run, paired differences."""

from typing import Dict, List, Optional, Sequence

__all__ = ["fmt", "seed_table", "difference_table"]


def fmt(x: Optional[float], spec: str = ".2f") -> str:
    """``x`` formatted with ``spec``; "-" for None and NaN (no value, e.g. the sd of one
    seed)."""
    return "-" if x is None or x != x else format(x, spec)


def seed_table(variants: Dict[str, dict], seeds: Sequence[int]) -> List[str]:
    """Lines of a markdown table: one row per variant with its AP per seed, mean and sd.

    Args:
        variants: {name: {"ap": [AP of each seed, in the order of ``seeds``], "mean", "sd"}}
            (:func:`dkd_det.evaluation.mean_sd` plus the values).
    """
    lines = [
        "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for name, v in variants.items():
        cells = [fmt(ap) for ap in v["ap"]] + [fmt(v["mean"]), fmt(v["sd"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def difference_table(differences: Dict[str, dict]) -> List[str]:
    """Lines of a markdown table: one row per paired difference (``{"a - b":``
    :func:`dkd_det.evaluation.paired_difference` ``}``) with its mean, 95% interval and the
    difference of each seed."""
    lines = ["| paired difference | mean | 95% CI | per seed |", "|---|---|---|---|"]
    for name, d in differences.items():
        ci = f"[{fmt(d['ci_low'], '+.2f')}, {fmt(d['ci_high'], '+.2f')}]"
        per_seed = ", ".join(fmt(x, "+.2f") for x in d["diffs"])
        lines.append(f"| {name} | {fmt(d['mean'], '+.2f')} | {ci} | {per_seed} |")
    return lines
