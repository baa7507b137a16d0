"""Matplotlib helpers for reduce: Agg backend, facet grids, and PNG + PDF output."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.layout_engine import TightLayoutEngine  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MIN_GENERATIONS = 2  # per-generation figures need at least this many generations after generation 0

# Reference curves look the same in every figure.
REF_STYLE = {
    "true": {"color": "black", "ls": ":", "lw": 1.2, "label": "generating θ"},
    "uniform": {"color": "tab:blue", "ls": "--", "lw": 1.4, "label": "Bayes, uniform prior"},
    "fitted": {"color": "tab:green", "ls": "-.", "lw": 1.6, "label": "Bayes, fitted prior"},
    "gamma": {"color": "tab:red", "ls": "--", "lw": 1.6, "label": "discounted (fitted γ)"},
    "mixture": {"color": "tab:purple", "ls": ":", "lw": 1.8, "label": "mixture reference"},
}
MODEL_STYLE = {"color": "tab:orange", "lw": 1.8, "label": "model"}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def grid(n: int, ncols: int = 3, panel: tuple[float, float] = (4.2, 3.0), sharey: bool = True,
         squeeze_cols: bool = True):
    """Figure with ``n`` panels in rows of ``ncols`` (unused panels hidden) → (fig, list of axes)."""
    n = max(n, 1)
    ncols = min(ncols, n) if squeeze_cols else ncols
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(panel[0] * ncols, 9.0), panel[1] * nrows + 1.2),
                             sharey=sharey, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def band(ax, x, values: np.ndarray, **style) -> None:
    """Mean over axis 0 as a line and ± one standard error as a shaded band (NaNs ignored)."""
    v = np.asarray(values, dtype=float)
    mean = np.nanmean(v, axis=0)
    n = np.maximum(np.sum(np.isfinite(v), axis=0), 1)
    sem = np.nanstd(v, axis=0) / np.sqrt(n)
    (line,) = ax.plot(x, mean, **style)
    if v.shape[0] > 1:
        ax.fill_between(x, mean - sem, mean + sem, color=line.get_color(), alpha=0.18, lw=0)


def too_few_generations(last_generation: int, what: str) -> str | None:
    """Why a per-generation figure of ``what`` is not drawn (fewer than :data:`MIN_GENERATIONS` generations
    after generation 0: a line between two points shows nothing the table does not), or None to draw it."""
    if last_generation >= MIN_GENERATIONS:
        return None
    ran = "no generation" if last_generation < 1 else "one generation (0 → 1)"
    return (f"No figure for {what}: the chains ran {ran}, which the table above shows in full; a per-generation "
            f"figure needs at least {MIN_GENERATIONS} generations.")


def generation_axis(ax, last_generation: int) -> None:
    """x axis of a per-generation panel: integer ticks 0..last, the same limits whether or not data is drawn."""
    ax.set_xlim(-0.25, last_generation + 0.25)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")


def no_data(ax, why: str = "no data") -> None:
    """Mark a panel that has nothing to draw: no y ticks, a grey note in its middle."""
    ax.set_yticks([])
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="grey", fontsize=9, wrap=True)


def has_data(*arrays) -> bool:
    """True when any of the arrays holds a finite value."""
    return any(np.isfinite(np.asarray(a, dtype=float)).any() for a in arrays)


def legend_below(fig, axes, ncol: int = 3) -> int:
    """One de-duplicated legend for the whole figure, under the panels; returns its number of rows."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if not seen:
        return 0
    ncol = min(len(seen), ncol)
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    return (len(seen) + ncol - 1) // ncol


def suptitle(fig, text: str, fontsize: float = 10) -> None:
    """Figure title wrapped to the figure width."""
    width = max(int(fig.get_figwidth() * 72 / (0.55 * fontsize)), 20)
    fig.suptitle(textwrap.fill(text, width), fontsize=fontsize)


def save(fig, out_dir: Path, name: str, legend_rows: int = 0) -> Path:
    """Write ``<out_dir>/<name>.png`` (dpi 110) and ``.pdf``; close the figure; return the PNG path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    h = fig.get_figheight()
    # the tight layout, applied once: Figure.tight_layout would leave a placeholder layout engine behind,
    # and with any engine set, every savefig draws the whole figure once more before printing it
    TightLayoutEngine(rect=(0, min(0.45, (0.18 * legend_rows + 0.05) / h), 1, 1)).execute(fig)
    png = out_dir / f"{slug(name)}.png"
    fig.savefig(png, dpi=110)
    fig.savefig(png.with_suffix(".pdf"))
    plt.close(fig)
    return png
