"""Plan a sweep: models × experiments → stores (created up front) → shards → tasks.

Stores are created by the planner, before anything runs or is submitted, so that array
tasks never race to create them; every check that can fail (configs, model names,
tokenization of choices, empty grids) runs here, before submission.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import ExperimentConfig, SweepConfig
from .errors import ConfigError
from .experiments import get_family
from .models.registry import ModelSpec, get_model_spec
from .paths import RESULTS_DIR
from .store import ResultStore, provenance, store_path


@dataclass
class Unit:
    """One (experiment, model) cell of a sweep = one Zarr store."""

    experiment: ExperimentConfig
    model: ModelSpec
    store: Path
    n_shards: int
    pending: list[int] = field(default_factory=list)


@dataclass
class Task:
    """What one job (array task) does: load ``model`` once, run these (experiment, shard) pairs."""

    sweep: str
    model: str
    work: list[tuple[str, int]]

    def to_json(self) -> dict:
        return {"sweep": self.sweep, "model": self.model, "work": [list(w) for w in self.work]}


def plan_sweep(sweep: SweepConfig, overwrite: bool = False, validate: bool = True,
               results_dir: Path | None = None) -> list[Unit]:
    units: list[Unit] = []
    tokenizers = {}
    for model_name in sweep.models:
        spec = get_model_spec(model_name)
        for exp in sweep.experiments:
            fam = get_family(exp.family)
            cells = fam.cells(exp.params)
            if not cells:
                raise ConfigError(f"experiments.{exp.name}.params", "empty grid: this config expands to no cells")
            if validate:
                if spec.name not in tokenizers:
                    from .models.loader import load_tokenizer
                    tokenizers[spec.name] = load_tokenizer(spec)
                fam.validate(exp.params, tokenizers[spec.name], spec.kind)
            path = store_path(sweep.name, exp.name, spec.name, results_dir)
            st = ResultStore.create(path, fam.arrays(exp.params), cells, exp.shard_size, fam.coords(exp.params),
                                    provenance(exp, spec), overwrite=overwrite)
            units.append(Unit(exp, spec, path, st.n_shards, st.pending_shards()))
    return units


def make_tasks(sweep_name: str, units: list[Unit], shards_per_task: int = 1, only_pending: bool = True) -> list[Task]:
    """Group shards into tasks, per model (one model load per task)."""
    by_model: dict[str, list[tuple[str, int]]] = {}
    for u in units:
        shards = u.pending if only_pending else list(range(u.n_shards))
        by_model.setdefault(u.model.name, []).extend((u.experiment.name, s) for s in shards)
    tasks = []
    for model, work in by_model.items():
        for i in range(0, len(work), shards_per_task):
            tasks.append(Task(sweep_name, model, work[i: i + shards_per_task]))
    return tasks


def write_manifest(sweep: SweepConfig, units: list[Unit], extra: dict | None = None,
                   results_dir: Path | None = None) -> Path:
    path = Path(results_dir or RESULTS_DIR) / sweep.name / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    doc = {
        "sweep": sweep.name,
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": sweep.models,
        "experiments": {e.name: e.raw for e in sweep.experiments},
        "units": [{"experiment": u.experiment.name, "model": u.model.name, "store": str(u.store),
                   "n_shards": u.n_shards, "template": u.model.template} for u in units],
        "submissions": old.get("submissions", []),
    }
    if extra:
        doc["submissions"].append(extra)
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path
