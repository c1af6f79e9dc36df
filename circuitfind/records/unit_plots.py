"""Figures of masks over units beyond the paper's: layers x positions (the causal-tracing picture)
for heads, MLPs and the residual stream, and patched neuron groups per layer."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from circuitfind.model.space import ComponentSpace  # noqa: E402
from circuitfind.records.files import save_figure  # noqa: E402


def patched_by_position(mask: np.ndarray, space: ComponentSpace) -> np.ndarray:
    """How much each unit is patched, 1 - w, as (layers, positions, units per position)."""
    return 1 - mask.reshape(space.n_layers, len(space.positions), space.per_position)


def panels(mask: np.ndarray, space: ComponentSpace) -> List[tuple[str, np.ndarray, float]]:
    """(title, layers x positions values, colour scale top) of each panel of a unit space."""
    patched = patched_by_position(mask, space)
    if space.kind == "residual":
        return [("residual stream patched (1 - w)", patched[..., 0], 1.0)]
    if space.kind == "neurons":
        counts = (patched > 0.5).sum(-1).astype(float)
        return [(f"neuron groups patched (of {space.per_position})", counts, max(1.0, counts.max()))]
    heads = patched[..., : space.n_heads].sum(-1)
    return [
        (
            f"heads patched: 1 - w summed over\nthe layer's {space.n_heads} heads at each position",
            heads,
            max(1.0, heads.max()),
        ),
        ("MLP patched (1 - w)", patched[..., space.n_heads], 1.0),
    ]


def unit_heatmaps(mask: np.ndarray, space: ComponentSpace, labels: Sequence[str], path: Path, title: str) -> None:
    """Layers x positions heatmaps of what the mask patches; `labels` name the positions (tokens under `all`)."""
    shown = panels(mask, space)
    n_pos = len(space.positions)
    width = 1.6 + 0.38 * max(n_pos, 4)
    fig, axes = plt.subplots(
        1, len(shown), figsize=(width * len(shown), 1.9 + 0.3 * space.n_layers), squeeze=False, layout="constrained"
    )  # constrained: the figure's title above the panels' titles, never on them
    for ax, (name, values, top) in zip(axes[0], shown):
        im = ax.imshow(values, vmin=0, vmax=top, cmap="magma", aspect="auto", origin="lower")
        ax.set_xticks(range(n_pos), list(labels), fontsize=7, rotation=90 if n_pos > 6 else 0)
        ax.set_yticks(range(space.n_layers), [str(layer) for layer in range(space.n_layers)], fontsize=7)
        ax.set_xlabel("position")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title, fontsize=9)
    save_figure(path, fig)
    plt.close(fig)


def neuron_counts(mask: np.ndarray, space: ComponentSpace, path: Path, title: str) -> None:
    """Patched neuron groups per layer, a bar per layer stacked by position."""
    counts = (patched_by_position(mask, space) > 0.5).sum(-1)  # (L, P)
    fig, ax = plt.subplots(figsize=(1.5 + 0.3 * space.n_layers, 3))
    bottom = np.zeros(space.n_layers)
    for p, position in enumerate(space.positions):
        ax.bar(range(space.n_layers), counts[:, p], bottom=bottom, label=f"@{position}")
        bottom += counts[:, p]
    ax.set_xlabel("layer")
    ax.set_xticks(range(space.n_layers))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no half ticks
    ax.set_ylabel(f"groups of {space.group_size} patched")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(path, fig)
    plt.close(fig)
