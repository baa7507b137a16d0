"""reduce_sweep: load a sweep, run the family reducers, write tables, summary.json and the report.

Output (``results/<sweep>/reduce`` unless ``out``)::

    tables/<name>.csv, tables/<name>.parquet   coverage, coverage_stores, and every reducer table
    figures/<name>.png, figures/<name>.pdf
    summary.json                               machine-readable: findings, coverage, per-model numbers per
                                               family, against_papers (ours next to the published values)
    report.md, report.html                     Findings on your models, Against the papers, Coverage, the
                                               reducers' sections, Raw-data-only, Appendix: provenance
    reduce_outputs.json                        the files this reduce wrote (paths relative to the output dir)

Ownership: reduce deletes only what it wrote. A re-run removes the files listed in the previous
run's ``reduce_outputs.json`` (stale tables/figures of a family that no longer reduces), then
records what this run wrote: every file under ``tables/`` and ``figures/`` that is new or changed
after the run, plus report.md/.html and summary.json. Any other file in the output dir (a user's
notes, their own tables next to ours) is never deleted; a file of the user's that has the name of
one of reduce's outputs is overwritten, like any output.

The findings (:mod:`.findings`) and "Against the papers" (:mod:`.published`) are built from the
reducers' results of this run; a failure in either is recorded like a failing reducer.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import BayesflipError
from ..store import git_commit
from .base import FamilyInput, ReducedFamily, Section, Text, get_reducer, reducer_names
from .load import SweepData, load_sweep_data
from .findings import build_findings, findings_section, findings_summary, findings_table
from .overview import coverage_section, provenance_section, raw_only_section
from .published import against_papers, load_published
from .report import write_report

log = logging.getLogger(__name__)


def _jsonable(x):
    """Plain JSON: numpy scalars/arrays to Python, NaN/inf to null, paths to str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _write_table(df: pd.DataFrame, tables_dir: Path, name: str) -> Path:
    df.to_csv(tables_dir / f"{name}.csv", index=False)
    df.to_parquet(tables_dir / f"{name}.parquet", index=False)
    return tables_dir / f"{name}.csv"


OUTPUTS = "reduce_outputs.json"


def _own_file(out: Path, rel: str) -> Path | None:
    """``out / rel`` when ``rel`` names a file inside ``out`` (no absolute path, no ``..``), else None."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return out / p


def _clean(out: Path) -> tuple[Path, Path]:
    """Create ``tables/`` and ``figures/``; remove the files the previous reduce listed in ``reduce_outputs.json``.

    Nothing else is deleted: a dir without that file (a user's dir, or one written before reduce
    kept it) keeps all its files."""
    tables, figs = out / "tables", out / "figures"
    listed = out / OUTPUTS
    if listed.is_file():
        try:
            files = json.loads(listed.read_text()).get("files", [])
        except (ValueError, AttributeError) as e:
            raise BayesflipError(f"{listed}: not a reduce output list ({e}); move it away and re-run") from e
        for rel in files:
            f = _own_file(out, str(rel))
            if f is not None and f.is_file():
                f.unlink()
    for d in (tables, figs):
        d.mkdir(parents=True, exist_ok=True)
    return tables, figs


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (mtime_ns, size) of every file under ``tables/`` and ``figures/``."""
    snap: dict[str, tuple[int, int]] = {}
    for d in ("tables", "figures"):
        for f in (out / d).rglob("*"):
            if f.is_file():
                st = f.stat()
                snap[f.relative_to(out).as_posix()] = (st.st_mtime_ns, st.st_size)
    return snap


def _record_outputs(out: Path, before: dict[str, tuple[int, int]], known: list[Path]) -> list[str]:
    """Write ``reduce_outputs.json``: files new or changed since ``before``, the ``known`` paths, the report."""
    after = _snapshot(out)
    files = {rel for rel, sig in after.items() if before.get(rel) != sig}
    for p in known:
        p = Path(p)
        if p.is_file():
            try:
                files.add(p.resolve().relative_to(out.resolve()).as_posix())
            except ValueError:  # written outside the output dir: not ours to delete later
                pass
    files |= {n for n in ("report.md", "report.html", "summary.json") if (out / n).is_file()}
    rows = sorted(files)
    tmp = out / f".{OUTPUTS}.tmp"
    tmp.write_text(json.dumps({"files": rows}, indent=1))
    tmp.replace(out / OUTPUTS)
    return rows


def _model_coverage(data: SweepData) -> dict[str, dict]:
    out: dict[str, dict] = {}
    summ = data.store_summary()
    for model, g in summ.groupby("model"):
        out[str(model)] = {"shards_total": int(g["shards_total"].sum()), "shards_done": int(g["shards_done"].sum()),
                           "cells_total": int(g["cells_total"].sum()),
                           "cells_trusted": int(g["cells_trusted"].sum()),
                           "problems": int((data.coverage[(data.coverage["model"] == model)]["status"] != "done").sum())}
    return out


def _model_kinds(data: SweepData) -> dict[str, str]:
    """model -> kind (``instruct`` / ``std``) as recorded in its stores' ``model_spec`` ("" when not recorded)."""
    out: dict[str, str] = {}
    for s in data.stores:
        kind = (s.attrs.get("model_spec") or {}).get("kind")
        if kind:
            out.setdefault(s.model, str(kind))
    return out


def _merge_sections(sections: list[Section], new: list[Section]) -> None:
    """Append ``new`` sections; a title already present (e.g. "Priors" from two families) gets the blocks appended."""
    for sec in new:
        same = next((s for s in sections if s.title == sec.title), None)
        if same is None:
            sections.append(Section(sec.title, list(sec.blocks)))
        else:
            same.blocks.extend(sec.blocks)


def reduce_sweep(sweep: str, results_dir=None, out=None, strict: bool = False) -> Path:
    """Reduce ``results/<sweep>`` into tables, figures, summary.json and the report; return report.md's path.

    A reducer that raises is recorded (report section "Reducer errors", ``summary.json``
    ``errors``) and its family is listed as raw data only; ``strict=True`` re-raises instead.
    """
    data = load_sweep_data(sweep, results_dir)
    out = Path(out) if out else data.root / "reduce"
    tables_dir, figs_dir = _clean(out)
    before = _snapshot(out)
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()

    written: list[Path] = [_write_table(data.coverage, tables_dir, "coverage"),
                           _write_table(data.store_summary(), tables_dir, "coverage_stores")]
    models = {m: {"coverage": c} for m, c in _model_coverage(data).items()}
    families: dict[str, dict] = {}
    status: dict[str, str] = {}
    sections: list[Section] = []
    raw: list[tuple[str, list, str]] = []
    errors: list[dict] = []
    by_family = data.by_family()
    order = [f for f in reducer_names() if f in by_family] + sorted(f for f in by_family if get_reducer(f) is None)
    figures: list[Path] = []
    done: dict[str, ReducedFamily] = {}  # earlier results, visible to later reducers (FamilyInput.earlier)
    for family in order:
        stores = by_family[family]
        usable = [s for s in stores if not s.empty]
        fam_info: dict[str, Any] = {"experiments": sorted({s.experiment for s in stores}), "models": sorted({s.model for s in stores})}
        fn = get_reducer(family)
        if fn is None:
            status[family] = "raw-only"
            raw.append((family, stores, "no reducer registered"))
        elif not usable:
            status[family] = "no-complete-shards"
            raw.append((family, stores, "no complete shard yet"))
        else:
            try:
                res: ReducedFamily = fn(FamilyInput(family=family, sweep=sweep, stores=usable,
                                                    figures_dir=figs_dir, tables_dir=tables_dir,
                                                    earlier=dict(done)))
            except Exception as e:  # recorded in the report and summary.json; other families still reduce
                if strict:
                    raise
                tb = traceback.format_exc()
                log.error("reducer %s failed: %s", family, tb)
                errors.append({"family": family, "error": f"{type(e).__name__}: {e}", "traceback": tb})
                status[family] = "error"
                raw.append((family, stores, f"reducer failed: {type(e).__name__}: {e}"))
            else:
                status[family] = "reduced"
                done[family] = res
                for name, df in res.tables.items():
                    written.append(_write_table(df, tables_dir, name if name.startswith(family) else f"{family}_{name}"))
                figures += res.figures
                _merge_sections(sections, res.sections)
                extra = dict(res.summary)
                for m, vals in (extra.pop("models", None) or {}).items():
                    models.setdefault(m, {})[family] = vals
                fam_info.update(extra)
        fam_info["status"] = status[family]
        families[family] = fam_info

    papers: dict = {}
    papers_sec: list[Section] = []
    try:
        sec, ptabs, papers, pfigs = against_papers(done, figs_dir)
    except Exception as e:  # recorded like a failing reducer; the rest of the report stands
        if strict:
            raise
        tb = traceback.format_exc()
        log.error("against-the-papers section failed: %s", tb)
        errors.append({"family": "against the papers", "error": f"{type(e).__name__}: {e}", "traceback": tb})
    else:
        if sec is not None:
            papers_sec.append(sec)
            for name, df in ptabs.items():
                written.append(_write_table(df, tables_dir, name))
            figures += pfigs
    findings: list = []
    try:
        found = build_findings(done, sorted(models), _model_kinds(data), data.store_summary(), load_published())
    except Exception as e:  # recorded like a failing reducer; the rest of the report stands
        if strict:
            raise
        tb = traceback.format_exc()
        log.error("findings section failed: %s", tb)
        errors.append({"family": "findings", "error": f"{type(e).__name__}: {e}", "traceback": tb})
        find_sec = [Section("Findings on your models", [Text("The findings could not be built: see "
                                                               "**Reducer errors** at the end of the report.")])]
    else:
        findings = findings_summary(found)
        written.append(_write_table(findings_table(found), tables_dir, "findings"))
        find_sec = [findings_section(found)]
    all_sections = [*find_sec, *papers_sec, coverage_section(data), *sections, raw_only_section(raw)]
    if errors:
        all_sections.append(Section("Reducer errors", [Text(f"**{e['family']}**: {e['error']}\n\n```\n"
                                                            f"{e['traceback']}\n```") for e in errors]))
    all_sections.append(provenance_section(data, commit, generated, status))
    report = write_report(out, f"bayesflip report — {sweep}", all_sections)
    prob = data.problems()
    summary = {
        "sweep": sweep, "generated": generated, "git_commit": commit, "results_root": str(data.root),
        "report": str(report.resolve()), "report_html": str((out / "report.html").resolve()),
        "coverage": {"shards_total": int((data.coverage["shard"] >= 0).sum()),
                     "shards_done": int((data.coverage["status"] == "done").sum()),
                     "problems": prob[["experiment", "model", "shard", "status", "error"]].to_dict("records")},
        "findings": findings, "models": models, "families": families, "against_papers": papers,
        "errors": [{k: e[k] for k in ("family", "error")} for e in errors],
        "tables": sorted(p.stem for p in written), "figures": [p.name for p in figures],
    }
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False))
    _record_outputs(out, before, [*written, *[p.with_suffix(".parquet") for p in written], *figures,
                          *[Path(p).with_suffix(".pdf") for p in figures]])
    return report


def reduce_cli(args) -> int:
    report = reduce_sweep(args.sweep, results_dir=getattr(args, "results_dir", None), out=getattr(args, "out", None))
    summary = json.loads((report.parent / "summary.json").read_text())
    print(f"report: {report.resolve()}")
    print(f"html:   {summary['report_html']}")
    cov = summary["coverage"]
    print(f"coverage: {cov['shards_done']}/{cov['shards_total']} shards done, {len(cov['problems'])} problems")
    for e in summary["errors"]:
        print(f"REDUCER ERROR {e['family']}: {e['error']}")
    return 1 if summary["errors"] else 0
