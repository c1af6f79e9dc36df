"""Figures: the mask heatmap, training curves, and the sweep's accuracy-vs-size plot."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from circuitfind.records.circuit import metric_key  # noqa: E402
from circuitfind.records.files import save_figure  # noqa: E402

Titles = Mapping[str, str]  # desideratum name -> title, in config order


def accuracy_series(desiderata: Titles) -> List[Tuple[str, str]]:
    """(metric key, label) of the held-out accuracy of each desideratum, and the first one's transfer."""
    series = [(metric_key(d, "test", "acc"), title) for d, title in desiderata.items()]
    if desiderata:
        first = next(iter(desiderata))
        series.append((metric_key(first, "transfer", "acc"), f"{first.upper()} transfer"))
    return series


def mask_heatmap(mask: np.ndarray, path: Path, title: str) -> None:
    """Layers x heads, plus an MLP column; dark = patched (w near 0)."""
    n_layers, n_cols = mask.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * n_cols, 1.0 + 0.3 * n_layers))
    im = ax.imshow(mask, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(n_cols), [str(h) for h in range(n_cols - 1)] + ["MLP"], fontsize=7)
    ax.set_yticks(range(n_layers), [str(layer) for layer in range(n_layers)], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="w (0 = patched)")
    save_figure(path, fig)
    plt.close(fig)


Points = List[Tuple[float, float]]


def curve_panels(history: List[Dict[str, float]], desiderata: Titles) -> List[Tuple[str, Dict[str, Points]]]:
    """The training curves by panel: (title, {metric key: (step, value) points})."""
    keys = [
        ("loss", [k for k in history[0] if k.endswith("_loss")] if history else []),
        ("sparsity term", ["sparsity"]),
        ("components with w < 0.5", ["n_patched"]),
        ("held-out accuracy (rounded mask)", [metric_key(d, "test", "acc") for d in desiderata]),
    ]
    return [
        (title, {k: [(r["step"], r[k]) for r in history if isinstance(r.get(k), (int, float))] for k in names})
        for title, names in keys
    ]


def training_curves(history: List[Dict[str, float]], desiderata: Titles, path: Path) -> None:
    """Losses, sparsity, components patched and held-out accuracy against step."""
    if not history:  # a baseline method ranks components without training steps
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no training steps: this method ranks components directly", ha="center", va="center")
        save_figure(path, fig)
        plt.close(fig)
        return
    panels = curve_panels(history, desiderata)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (title, curves) in zip(axes, panels):
        for key, pts in curves.items():
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if any(curves.values()):
            ax.legend(fontsize=7)
    save_figure(path, fig)
    plt.close(fig)


MARKERS, STYLES = "osD^v<>", ("-", "--", ":", "-.")


def sweep_axes(rows: List[Dict[str, float]], desiderata: Titles):
    """The paper's figure: each desideratum's held-out accuracy against the number of components patched.

    Every point sits on its integer size; series that coincide stay visible through hollow markers of
    different shapes and sizes and their own line styles. The lambdas of each size are written under
    its tick, horizontal and readable (7 pt); with many sizes, every size keeps its tick and the
    lambdas go to the sweep summary's table.
    """
    rows = sorted(rows, key=lambda r: (r["n_patched"], r.get("lam") or 0.0))
    sizes = sorted({int(r["n_patched"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(sizes) + 2), 4.0))
    series = accuracy_series(desiderata)
    for i, (key, label) in enumerate(series):
        pts = [(r["n_patched"], r[key]) for r in rows if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(
                xs, ys, marker=MARKERS[i % len(MARKERS)], markersize=9 - 1.5 * (i % 3), fillstyle="none",
                linestyle=STYLES[i % len(STYLES)], label=label, alpha=0.9,
            )  # fmt: skip
    lams: Dict[int, List[str]] = {}
    for r in rows:
        if r.get("lam") is not None:
            lams.setdefault(int(r["n_patched"]), []).append(f"{r['lam']:g}")
    labelled = lams and len(sizes) <= 8
    ax.set_xticks(
        sizes, [f"{n}\nλ={','.join(lams[n])}" if labelled and n in lams else str(n) for n in sizes], fontsize=7
    )
    if sizes:
        ax.set_xlim(min(sizes) - 0.5, max(sizes) + 0.5)
    ax.set_xlabel("components patched" + (" (and the lambdas that gave each size)" if labelled else ""), fontsize=9)
    ax.set_ylabel("accuracy (held out)", fontsize=9)
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def sweep_figure(rows: List[Dict[str, float]], desiderata: Titles, path: Path) -> None:
    """sweep_axes, written to `path`."""
    fig = sweep_axes(rows, desiderata)
    save_figure(path, fig)
    plt.close(fig)


def attention_figure(weights: np.ndarray, labels: List[str], heads: List[str], path: Path) -> None:
    """Final-position attention of each circuit head over the prompt's tokens."""
    fig, ax = plt.subplots(figsize=(1.5 + 0.32 * len(labels), 1.2 + 0.35 * len(heads)))
    im = ax.imshow(weights, vmin=0, vmax=max(float(weights.max()), 1e-6), cmap="magma", aspect="auto")
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
    ax.set_yticks(range(len(heads)), heads, fontsize=7)
    ax.set_xlabel("prompt position (tokens of the first prompt; averaged over held-out prompts)")
    ax.set_title("attention of the final position, circuit heads", fontsize=9)
    fig.colorbar(im, ax=ax, label="attention")
    save_figure(path, fig)
    plt.close(fig)


def faithfulness_figure(curves: Dict[str, dict], desiderata: Titles, path: Path) -> None:
    """Held-out accuracy of each desideratum against components patched, one line per ranking method."""
    panels = [(metric_key(d, "test", "acc"), f"{title} accuracy") for d, title in desiderata.items()]
    first = next(iter(desiderata))
    panels.append((metric_key(first, "test", "logit_diff_norm"), f"{first.upper()} normalised logit difference"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.3))
    for ax, (key, title) in zip(axes, panels):
        for method, c in curves.items():
            if key in c["curve"]:
                x = np.array(c["sizes"], dtype=float)
                ax.plot(np.maximum(x, 0.5), c["curve"][key], marker=".", label=f"{method} (AUC {c['auc'][key]:.2f})")
        ax.set_xscale("log")
        ax.set_xlabel("components patched (top n; 0 at 0.5)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    save_figure(path, fig)
    plt.close(fig)
