"""Matplotlib helpers for reduce: Agg backend, facet grids, and PNG + PDF output."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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
    fig.tight_layout(rect=(0, min(0.45, (0.18 * legend_rows + 0.05) / h), 1, 1))
    png = out_dir / f"{slug(name)}.png"
    fig.savefig(png, dpi=110)
    fig.savefig(png.with_suffix(".pdf"))
    plt.close(fig)
    return png
