"""``bayesflip demo [--sweep S]``: a sweep (default ``demo``; ``paper_smol`` for ``make paper-smol``)
end to end on smollm2-135m-instruct, then reduce + report.

Runs the sweep through :func:`bayesflip.job.run_local` (plan, then every pending shard
in-process: the same code path as ``bayesflip debug`` and the cluster jobs; completed shards
are skipped, ``overwrite`` recomputes), then :func:`bayesflip.reduce.reduce_sweep`, and
prints the absolute paths of the report: ``report.md`` and ``report.html`` (standalone, figures
embedded; open it in a browser).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

DEMO_SWEEP = "demo"
DEMO_MODEL = "smollm2-135m-instruct"


def run_demo(sweep: Optional[str] = None, *, overwrite: bool = False, results_dir: Path | str | None = None,
             device: Optional[str] = None, out: Callable[[str], Any] = print) -> int:
    """Run ``sweep`` (default ``demo``) on the demo model, reduce it, print where the report is.
    Returns 1 when some shard failed (the report's Coverage section names it), else 0."""
    from .errors import Interrupted
    from .job import run_local
    from .reduce import reduce_sweep

    sweep = sweep or DEMO_SWEEP
    t0 = time.time()
    resume = f"bayesflip demo --sweep {sweep}" + (f" --results-dir {results_dir}" if results_dir else "")
    # Ctrl-C while running: Interrupted("interrupted; N/M shards done, resume with `bayesflip demo ...`")
    rc = run_local(sweep, DEMO_MODEL, overwrite=overwrite, results_dir=results_dir, device=device, out=out,
                   resume=resume).rc
    t1 = time.time()
    try:
        report = reduce_sweep(sweep, results_dir=results_dir)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while reducing (every shard is kept); resume with `{resume}`") from None
    t2 = time.time()
    out(f"{sweep}: run {t1 - t0:.1f} s, reduce {t2 - t1:.1f} s, total {t2 - t0:.1f} s"
        + ("" if rc == 0 else " (some shards failed: see the report's Coverage section)"))
    out(f"report: {report.resolve()}")
    out(f"html:   {report.with_suffix('.html').resolve()}")
    return rc
