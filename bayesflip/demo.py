"""``bayesflip demo [--sweep S]``: a sweep (default ``demo``; ``paper_smol`` for ``make paper-smol``)
end to end on smollm2-135m-instruct, then reduce + report.

Runs the sweep through :func:`bayesflip.commands.cmd_debug` (plan, then every pending shard
in-process: the same code path as ``bayesflip debug`` and the cluster jobs; completed shards
are skipped, ``--overwrite`` recomputes), then :func:`bayesflip.reduce.reduce_sweep`, and
prints the absolute paths of the report: ``report.md`` and ``report.html`` (standalone, figures
embedded; open it in a browser).
"""

from __future__ import annotations

import argparse
import time

DEMO_SWEEP = "demo"
DEMO_MODEL = "smollm2-135m-instruct"


def demo_cli(args) -> int:
    from .errors import Interrupted
    from .commands import cmd_debug
    from .reduce import reduce_sweep

    sweep = getattr(args, "sweep", None) or DEMO_SWEEP
    t0 = time.time()
    results_dir = getattr(args, "results_dir", None)
    resume = f"bayesflip demo --sweep {sweep}" + (f" --results-dir {results_dir}" if results_dir else "")
    run_args = argparse.Namespace(sweep=sweep, model_type=DEMO_MODEL, overwrite=getattr(args, "overwrite", False),
                                  results_dir=results_dir, device=getattr(args, "device", None), resume=resume)
    rc = cmd_debug(run_args)          # Ctrl-C: Interrupted("interrupted; N/M shards done, resume with `...demo...`")
    t1 = time.time()
    try:
        report = reduce_sweep(sweep, results_dir=run_args.results_dir)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while reducing (every shard is kept); resume with `{resume}`") from None
    t2 = time.time()
    print(f"{sweep}: run {t1 - t0:.1f} s, reduce {t2 - t1:.1f} s, total {t2 - t0:.1f} s"
          + ("" if rc == 0 else " (some shards failed: see the report's Coverage section)"))
    print(f"report: {report.resolve()}")
    print(f"html:   {report.with_suffix('.html').resolve()}")
    return rc
