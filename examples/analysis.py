#!/usr/bin/env python
"""A tour of a sweep's raw results in xarray / pandas (see docs/ANALYSIS.md).

Reproduces the report's ICL figure -- mean P(heads) vs position (outcomes seen), one line per θ --
from the raw log-probabilities of the demo sweep::

    bayesflip demo                                  # once: results/demo
    python examples/analysis.py [--results-dir DIR] [--out icl_heads.png]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import bayesflip  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", default=None, help="default: the repository's results/")
    ap.add_argument("--sweep", default="demo")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="icl_heads.png")
    args = ap.parse_args(argv)

    # 1. one store as a labelled xarray.Dataset (verified cells only)
    ds = bayesflip.open_store(args.sweep, "icl_coin", args.model, results_dir=args.results_dir)
    print(ds)

    # 2. P(heads) renormalised over the two choices, averaged over the cells of each θ
    p = np.exp(ds["logprobs"])
    p_heads = (p / p.sum("choice")).sel(choice=" heads")
    curve = p_heads.groupby("theta").mean("cell")            # (theta, position)
    print(curve.to_pandas().round(3).iloc[:, :8])

    # 3. the same as a pandas long table (one row per cell, position, choice)
    df = bayesflip.tidy(args.sweep, "icl_coin", "logprobs", model=args.model, results_dir=args.results_dir)
    print(df.head())

    # 4. the whole sweep as a DataTree: experiment / model
    tree = bayesflip.open_sweep(args.sweep, results_dir=args.results_dir)
    print(sorted(tree.children))

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for theta in curve["theta"].values:
        line = curve.sel(theta=theta)
        ax.plot(line["position"], line, label=f"θ={theta:g}")
        ax.axhline(theta, color=ax.lines[-1].get_color(), lw=0.8, ls=":")
    ax.set_xlabel("outcomes seen")
    ax.set_ylabel("mean P(heads)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{args.sweep}/icl_coin, {args.model}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
