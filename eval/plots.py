"""The report's PNG plots (matplotlib, Agg backend: no display needed): quality against decode
speed per artifact with its Pareto frontier, and per-stage bars of size, speed and quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FRONTIER_FILE = "frontier.png"
BARS_FILE = "stages.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The (name, speed, loss) points no other point beats on both (faster and lower loss),
    sorted by speed."""
    front = [p for p in points
             if not any(q[1] >= p[1] and q[2] <= p[2] and (q[1], q[2]) != (p[1], p[2]) for q in points)]
    return sorted(front, key=lambda p: p[1])


def quality_scale(values: list[float]) -> str:
    """"log" where the artifacts' quality spans more than 10x (a broken stage's perplexity of 1,000
    beside a teacher's 20 would flatten every other point onto the axis), else "linear"."""
    positive = [v for v in values if v > 0]
    return "log" if len(positive) == len(values) and max(positive) > 10 * min(positive) else "linear"


def frontier_plot(rows: list[dict[str, Any]], speed_key: str, quality_key: str, path: Path) -> bool:
    """Quality (lower is better) against decode tok/s; False (nothing written) without two numbers."""
    points = [(r["artifact"], r[speed_key], r[quality_key]) for r in rows
              if r.get(speed_key) is not None and r.get(quality_key) is not None]
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.scatter([p[1] for p in points], [p[2] for p in points], color="tab:blue")
    for name, x, y in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front(points)
    ax.plot([p[1] for p in front], [p[2] for p in front], "--", color="tab:orange", label="Pareto frontier")
    ax.set_xlabel(f"decode tok/s ({speed_key})")
    scale = quality_scale([p[2] for p in points])
    ax.set_yscale(scale)
    ax.set_ylabel(f"{quality_key} (lower is better{', log scale' if scale == 'log' else ''})")
    ax.set_title("quality vs decode speed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def stage_bars(rows: list[dict[str, Any]], metrics: list[tuple[str, str]], path: Path) -> bool:
    """One bar chart per (key, title) in `metrics`, one bar per artifact; False without any number."""
    panels = [(key, title) for key, title in metrics if any(r.get(key) is not None for r in rows)]
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), dpi=100, squeeze=False)
    names = [r["artifact"] for r in rows]
    for ax, (key, title) in zip(axes[0], panels):
        values = [r.get(key) or 0.0 for r in rows]
        ax.bar(range(len(names)), values, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
