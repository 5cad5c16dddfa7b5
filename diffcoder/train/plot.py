"""Training curves of one or more runs, overlaid (for ablations): loss, grad norm, u_max, mask rate."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffcoder.fsutil import atomic_file

PANELS = (("loss", "loss"), ("grad_norm", "grad norm"), ("u_max", "u_max (corruption warmup)"),
          ("mask_rate", "mask rate"))


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run}: no metrics.jsonl (is this a `diffcoder train` run directory?)")
    recs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not valid JSON") from None
    if not recs:
        raise ValueError(f"{path}: no records yet")
    return recs


def plot_runs(runs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Write a 2x2 figure; panels a run has no data for (AR: u_max, mask rate) are left out for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"--out {out}: use a .png, .pdf or .svg file name")
    if labels and len(labels) != len(runs):
        raise ValueError(f"--labels: {len(labels)} given for {len(runs)} runs")
    data = [read_metrics(r) for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (key, title) in zip(axes.flat, PANELS):
        for i, recs in enumerate(data):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if pts:
                xs, ys = zip(*pts)
                # One colour per run in every panel, even where another run has no data.
                ax.plot(xs, ys, label=labels[i] if labels else Path(runs[i]).name, lw=1.2, color=f"C{i}")
            if key == "loss":
                val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
                if val:
                    xs, ys = zip(*val)
                    ax.plot(xs, ys, "o--", ms=3, lw=0.8, color=f"C{i}", label=f"{labels[i] if labels else Path(runs[i]).name} (val)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(out, "wb") as fh:
            fig.savefig(fh, dpi=120, format=out.suffix[1:].lower())
    finally:
        plt.close(fig)
    return out
