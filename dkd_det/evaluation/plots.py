"""Pictures of a comparison over paired seeds (matplotlib, drawn off-screen to PNG files)."""

from typing import Dict, List, Optional, Sequence, Tuple

from .runs import read_metrics
from .stats import mean_sd, t_half_width

__all__ = ["plot_ap_per_seed", "plot_losses", "LOSS_PANELS", "DETECTION_LOSSES"]

# detectron2's own losses (R-CNN, RPN, mask head); any other loss_* a run logs is a
# distillation term's.
DETECTION_LOSSES = ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_mask")
# (panel title, metrics.json keys drawn in it; None: every distillation loss the run logged)
LOSS_PANELS: List[Tuple[str, Optional[Sequence[str]]]] = [
    ("total loss", ("total_loss",)),
    ("loss_cls (box classification)", ("loss_cls",)),
    ("loss_box_reg", ("loss_box_reg",)),
    ("distillation losses (loss_dkd, loss_kd, loss_pkd, ...)", None),
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ap_per_seed(
    per_variant: Dict[str, List[float]],
    path: str,
    reference: Optional[Tuple[str, float]] = None,
    ylabel: str = "COCO box AP (test split)",
) -> None:
    """AP per variant: every seed a dot (seed k joined across variants: they are paired), the
    mean with its 95% t interval as a square with a bar; ``reference`` ``(label, AP)``, e.g.
    the teacher, as a dashed line. Writes the PNG ``path``.

    Args:
        per_variant: {variant: [AP of seed 0, seed 1, ...]}, the same seeds for every variant.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(per_variant)
    for x, name in enumerate(names):
        aps = per_variant[name]
        s = mean_sd(aps)
        half = t_half_width(s["sd"], s["n"]) if s["n"] > 1 else 0
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
    if reference is not None:
        label, ap = reference
        ax.axhline(ap, color="tab:red", linestyle="--", label=f"{label} {ap:.2f}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(ylabel)
    ax.set_title(
        "every seed (dots, paired seeds joined); mean and 95% CI (square, bar)", fontsize=8
    )
    if reference is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_losses(
    runs: Dict[str, str],
    path: str,
    panels: Sequence[Tuple[str, Optional[Sequence[str]]]] = LOSS_PANELS,
) -> None:
    """Training curves against the iteration from each run's ``metrics.json``: one panel per
    ``(title, keys)`` of ``panels``, one line per run and key the run logged. Writes the PNG
    ``path``.

    Args:
        runs: {label: a detectron2 run's OUTPUT_DIR}.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = axes[0]
    for name, out in runs.items():
        records = [r for r in read_metrics(out) if "total_loss" in r]
        it = [r["iteration"] for r in records]
        logged = list(records[0]) if records else []
        for ax, (_, panel_keys) in zip(axes, panels):
            keys = panel_keys
            if keys is None:
                keys = [k for k in logged if k.startswith("loss_") and k not in DETECTION_LOSSES]
            for k in keys:
                if records and k in records[0]:
                    label = f"{name}: {k}" if panel_keys is None or len(keys) > 1 else name
                    ax.plot(it, [r[k] for r in records], marker=".", label=label)
    for ax, (title, _) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
