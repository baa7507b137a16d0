"""The family-independent report sections: Coverage (short, near the top), Raw-data-only families, and the
appendix with the provenance (models, experiments, config hashes, git commits, library versions, per-store coverage).

Provenance values a store did not record are shown as "not recorded", never as ``None``."""

from __future__ import annotations

import pandas as pd

from .base import Block, Section, Table, Text
from .load import StoreData, SweepData


_UNSET = {"None", "nan", ""}


def _join(values: set[str]) -> str:
    """Sorted recorded values joined by ", " ("not recorded" when none was)."""
    vals = sorted(v for v in values if v not in _UNSET)
    return ", ".join(vals) if vals else "not recorded"


def provenance_tables(data: SweepData) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(models, experiments, library versions) as recorded in the stores' attrs and shard records."""
    models, exps, versions = {}, {}, []   # type: dict[str, dict], dict[str, dict], list[dict]
    for s in data.stores:
        a = s.attrs
        spec = a.get("model_spec") or {}
        m = models.setdefault(s.model, {"model": s.model, "model_id": a.get("model_id"), "kind": spec.get("kind"),
                                        "backend": spec.get("backend"), "revision": set(), "job_revision": set()})
        m["revision"].add(str(a.get("model_revision")))
        m["job_revision"] |= {str(r["model_revision"]) for r in s.records.values() if r.get("model_revision")}
        e = exps.setdefault(s.experiment, {"experiment": s.experiment, "family": s.family, "config_hash": set(),
                                           "seed": a.get("seed"), "shard_size": a.get("shard_size"),
                                           "n_cells": a.get("n_cells"), "git_commit": set(), "created": set()})
        e["config_hash"].add(str(a.get("config_hash")))
        e["git_commit"].add(str(a.get("git_commit")))
        e["created"].add(str(a.get("created")))
        v = {"experiment": s.experiment, "model": s.model, **(a.get("versions") or {})}
        versions.append(v)

    def flat(rows):
        return pd.DataFrame([{k: _join(v) if isinstance(v, set) else v for k, v in r.items()} for r in rows])

    vdf = pd.DataFrame(versions)
    if not vdf.empty:
        vcols = [c for c in vdf.columns if c not in ("experiment", "model")]
        vdf = vdf.drop_duplicates(subset=vcols).reset_index(drop=True)
    return flat(models.values()), flat(exps.values()), vdf


def provenance_section(data: SweepData, reduce_commit: str, generated: str, families: dict[str, str]) -> Section:
    """Appendix: where the numbers come from (sweep, commit, models, experiments, versions, per-store coverage)."""
    mdf, edf, vdf = provenance_tables(data)
    fam = ", ".join(f"{f} ({st})" for f, st in sorted(families.items())) or "none"
    return Section("Appendix: provenance", [
        Text(f"Sweep **{data.sweep}** — results `{data.root}`; reduced {generated} at git commit `{reduce_commit}`. "
             f"{len(data.stores)} stores readable; families: {fam}."),
        Table(mdf, "Models (registry id, revision recorded at planning and by the jobs)."),
        Table(edf, "Experiments (config hash, seed, shard size, git commit and time when the stores were created)."),
        Table(vdf, "Library versions recorded in the stores (one row per distinct combination)."),
        Table(data.store_summary(), "Coverage per store."),
    ])


def coverage_section(data: SweepData) -> Section:
    """Short: one sentence, and the missing / failed / corrupt shards if any (per-store counts: the appendix)."""
    summ = data.store_summary()
    prob = data.problems()
    n_sh, n_done = int(summ["shards_total"].sum()), int(summ["shards_done"].sum())
    n_c, n_ct = int(summ["cells_total"].sum()), int(summ["cells_trusted"].sum())
    blocks: list[Block] = [Text(f"{n_done} of {n_sh} shards done ({n_ct} of {n_c} cells trusted) in {len(summ)} stores. "
                   + ("Only shards with a `done` record whose chunks decode are used; everything else is listed "
                      "below and left out." if len(prob) else "No missing, failed or corrupt shards.")
                   + " Per-store counts are in the appendix.")]
    if len(prob):
        show = prob[["experiment", "model", "shard", "cell_start", "cell_stop", "status", "error"]].copy()
        show["error"] = show["error"].astype(str).str.slice(0, 200)
        blocks.append(Table(show, f"{len(prob)} missing / failed / corrupt shards or stores.", max_rows=200))
    return Section("Coverage", blocks)


def raw_only_section(raw: list[tuple[str, list[StoreData], str]]) -> Section:
    """Families the report has no reducer output for: what data there is, and why."""
    if not raw:
        return Section("Raw-data-only families", [Text("Every family in the sweep has a reducer and reduced.")])
    rows = []
    for family, stores, why in raw:
        for s in stores:
            rows.append({"family": family, "experiment": s.experiment, "model": s.model,
                         "cells_trusted": len(s.cells), "cells_total": s.n_cells,
                         "arrays": ", ".join(f"{k}({', '.join(v)})" for k, v in s.dims.items()),
                         "store": str(s.path), "why": why})
        if not stores:
            rows.append({"family": family, "why": why})
    return Section("Raw-data-only families", [
        Text("These families are in the sweep but have no reducer output (no reducer registered, no complete "
             "shard, or the reducer failed). Their stores are listed for direct use, e.g. "
             "`bayesflip.reduce.load.load_sweep_data(sweep).stores[i].tidy(array)`."),
        Table(pd.DataFrame(rows), "Raw-data-only stores."),
    ])
