"""PNG figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import functools
import pathlib

import numpy as np


@functools.cache
def pyplot():
    """matplotlib.pyplot on the Agg backend, imported when the first figure is drawn (the import
    takes about a second, which every training process would otherwise pay at start-up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a finite number under `key`."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def panel_grid(count: int, width: float = 4.5, height: float = 3.5):
    """A figure with `count` panels in rows of at most 3; returns (figure, flat list of axes)."""
    columns = min(3, count)
    rows = -(-count // columns)
    figure, axes = pyplot().subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for extra in axes.flat[count:]:
        extra.set_visible(False)
    return figure, list(axes.flat[:count])


def save(figure, path: pathlib.Path):
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)


def plot_loss_curve(records: list[dict], path: pathlib.Path, title: str):
    """Training loss per step and held-out validation loss at the eval steps, in nats/token (bytes: nats/byte)."""
    figure, (axis,) = panel_grid(1, 7, 4.5)
    axis.plot(*series(records, "train_loss"), lw=1, alpha=0.8, label="train")
    axis.plot(*series(records, "val_loss"), "o-", lw=1.5, label="validation (held-out files)")
    axis.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    save(figure, path)


def validation_curves(curves: dict[str, dict[int, list[dict]]], flops_per_step: dict[str, float] | None = None
                      ) -> dict[str, dict[int, tuple[list[float], list[float]]]]:
    """What `plot_sweep_curves` draws: method -> seed -> (x, validation losses) from curves:
    method -> seed -> metrics records; x is the step, or the training FLOPs (step x
    flops_per_step[method]) when flops_per_step is given."""
    def points(method: str, records: list[dict]) -> tuple[list[float], list[float]]:
        steps, losses = series(records, "val_loss")
        scale = 1 if flops_per_step is None else flops_per_step[method]
        return [step * scale for step in steps], losses

    return {method: {seed: points(method, records) for seed, records in by_seed.items()}
            for method, by_seed in curves.items()}


def plot_sweep_curves(curves: dict[str, dict[int, list[dict]]], flops_per_step: dict[str, float],
                      path: pathlib.Path):
    """Validation loss against training FLOPs (step x flops_per_step[method]): one colour per
    method (20 distinct ones), one line per seed; the right panel zooms into the second half of
    the FLOPs, where the methods separate. curves: method -> seed -> records."""
    drawn = validation_curves(curves, flops_per_step)
    colours = pyplot().get_cmap("tab10" if len(drawn) <= 10 else "tab20")
    figure, axes = panel_grid(2, 7.5, 5.5)
    half = max(x for by_seed in drawn.values() for xs, _ in by_seed.values() for x in xs) / 2
    for colour, (method, by_seed) in enumerate(drawn.items()):
        for index, (x, losses) in enumerate(by_seed.values()):
            for axis in axes:
                axis.plot(x, losses, "o-", ms=3, lw=1, color=colours(colour % colours.N), alpha=0.8,
                          label=method if index == 0 else None)
    late = [v for by_seed in drawn.values() for xs, losses in by_seed.values() for x, v in zip(xs, losses) if x >= half]
    if late:
        margin = 0.05 * (max(late) - min(late)) + 1e-6
        axes[1].set(xlim=(half, None), ylim=(min(late) - margin, max(late) + margin))
    axes[0].set(title="validation loss vs training FLOPs")
    axes[1].set(title="second half of the FLOPs (zoomed)")
    for axis in axes:
        axis.set(xlabel="training FLOPs", ylabel="validation loss (nats / byte)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    save(figure, path)


def plot_weight_heatmaps(weights: dict[str, np.ndarray], path: pathlib.Path):
    """One heatmap per method of its learned per-layer weights [L (layer l), L (earlier layer i)]."""
    figure, axes = panel_grid(len(weights))
    for axis, (method, matrix) in zip(axes, weights.items()):
        image = axis.imshow(matrix, cmap="viridis")
        axis.set(title=method, xlabel="earlier layer i", ylabel="layer l",
                 xticks=range(matrix.shape[1]), yticks=range(matrix.shape[0]))
        for (row, col), value in np.ndenumerate(matrix):
            axis.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
        figure.colorbar(image, ax=axis, shrink=0.8)
    save(figure, path)
