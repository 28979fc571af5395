"""The VaRM weights as a picture: each target's weight by decoder layer and module."""

from __future__ import annotations

from pathlib import Path

from fusechat.merge.varm import layer_of


def heatmap(weights: dict[str, dict[str, float]], path: Path) -> bool:
    """PNG of each target's VaRM weight by decoder layer (rows) and module (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells: dict[tuple[int, str], dict[str, float]] = {}
    for name, per_model in weights.items():
        layer = layer_of(name)
        if layer is not None:
            cells[layer[1:]] = per_model
    if not cells:
        return False
    layers = sorted({layer for layer, _ in cells})
    modules = sorted({m for _, m in cells})
    models = list(next(iter(cells.values())))
    fig, axes = plt.subplots(
        1, len(models), figsize=(1 + 0.5 * len(modules) * len(models), 1.5 + 0.3 * len(layers))
    )
    axes = np.atleast_1d(axes)
    for ax, model in zip(axes, models, strict=True):
        grid = np.full((len(layers), len(modules)), np.nan)
        for (layer, module), pm in cells.items():
            grid[layers.index(layer), modules.index(module)] = pm.get(model, np.nan)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(Path(model).name, fontsize=8)
        ax.set_xticks(range(len(modules)), modules, rotation=90, fontsize=6)
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
        ax.set_ylabel("layer")
    fig.subplots_adjust(bottom=0.35, top=0.9)
    fig.colorbar(im, ax=list(axes), label="VaRM weight")
    fig.savefig(path, dpi=100)  # no bbox_inches="tight": it draws the figure twice
    plt.close(fig)
    return True
