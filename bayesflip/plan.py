"""Plan a sweep: models × experiments → stores (created up front) → shards → tasks.

Stores are created by the planner, before anything runs or is submitted, so that array
tasks never race to create them; every check that can fail (configs, model names,
tokenization of choices, empty grids, store identity) runs here, before submission.
``plan_sweep(..., create=False)`` plans without writing anything (dry runs, and the
array-size checks that must pass before any store is created). A shard is pending when it
is not verified done (see :mod:`bayesflip.store`) and no live job holds its lease.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import ExperimentConfig, SweepConfig
from .errors import ConfigError
from .experiments import get_family
from .models.registry import ModelSpec, get_model_spec
from .paths import RESULTS_DIR
from .store import ResultStore, atomic_write_text, identity, identity_diff, provenance, store_path
from .store_layout import check_names
from .errors import StoreIdentityError


@dataclass
class Unit:
    """One (experiment, model) cell of a sweep = one Zarr store."""

    experiment: ExperimentConfig
    model: ModelSpec
    store: Path
    n_shards: int
    pending: list[int] = field(default_factory=list)
    held: dict[int, str] = field(default_factory=dict)      # shard → live holder (not pending)
    n_cells: int = 0


@dataclass
class Task:
    """What one job (array task) does: load ``model`` once, run these (experiment, shard) pairs."""

    sweep: str
    model: str
    work: list[tuple[str, int]]

    def to_json(self) -> dict:
        return {"sweep": self.sweep, "model": self.model, "work": [list(w) for w in self.work]}


HUGE_GRID = 1_000_000   # cells of one store above which the planner warns (time + memory)


def _estimate(cells: list[dict], arrays: dict) -> tuple[float, float]:
    """(GB of memory the planner holds for the cells, GB of the store's arrays uncompressed)."""
    import numpy as np

    n = len(cells)
    c0 = cells[0]
    per_cell = sys.getsizeof(c0) + sum(sys.getsizeof(v) for v in c0.values())
    per_arr = sum(int(np.prod(a.shape or (1,))) * (8 if a.dtype in ("str", "float64", "int64") else 4)
                  for a in arrays.values())
    return n * per_cell / 1e9, n * per_arr / 1e9


def plan_sweep(sweep: SweepConfig, overwrite: bool = False, validate: bool = True,
               results_dir: Path | None = None, create: bool = True, warn=None,
               cells_cache: dict | None = None, tokenizers: dict | None = None) -> list[Unit]:
    """Every (experiment, model) unit with its pending shards; creates the stores unless ``create=False``.

    ``cells_cache`` (experiment name → cells) lets a second planning pass reuse the grids of the first.
    ``tokenizers`` (model name → tokenizer) are used for validation instead of loading them; a model
    mapped to None is not validated (a dry run costing an unprepared Hub model with a proxy tokenizer)."""
    cells_cache = {} if cells_cache is None else cells_cache
    tokenizers = dict(tokenizers or {})
    if warn is None:
        def warn(msg):
            print(f"bayesflip: warning: {msg}", file=sys.stderr)
    units: list[Unit] = []
    for model_name in sweep.models:
        spec = get_model_spec(model_name)
        for exp in sweep.experiments:
            fam = get_family(exp.family)
            if exp.name not in cells_cache:
                cells_cache[exp.name] = fam.cells(exp.params)
            cells = cells_cache[exp.name]
            if not cells:
                raise ConfigError(f"experiments.{exp.name}.params", "empty grid: this config expands to no cells")
            arrays = fam.arrays(exp.params)
            if len(cells) > HUGE_GRID and spec.name == sweep.models[0] and warn is not False:
                mem, disk = _estimate(cells, arrays)
                warn(f"experiment {exp.name}: huge grid of {len(cells):,} cells "
                     f"({(len(cells) + exp.shard_size - 1) // exp.shard_size:,} shards of {exp.shard_size}); "
                     f"planning holds ~{mem:.1f} GB of cell dicts per job, the arrays take ~{disk:.1f} GB per model "
                     f"uncompressed; consider a coarser grid or a larger shard_size")
            if fam.requires:  # optional backend capabilities (attention mass), checked before anything is written
                from .backends import check_requirements
                check_requirements(spec, fam.requires, f"experiment {exp.name} (family {fam.name})")
            if validate and not (spec.name in tokenizers and tokenizers[spec.name] is None):
                if spec.name not in tokenizers:
                    from .models.loader import load_tokenizer
                    tokenizers[spec.name] = load_tokenizer(spec)
                fam.validate(exp.params, tokenizers[spec.name], spec.kind)
            path = store_path(sweep.name, exp.name, spec.name, results_dir)
            n_shards = (len(cells) + exp.shard_size - 1) // exp.shard_size
            if create:
                attrs = provenance(exp, spec)
                if (ev := fam.evidence(exp.params)) is not None:   # the cells' evidence kind, read by reduce
                    attrs["evidence"] = ev
                st = ResultStore.create(path, arrays, cells, exp.shard_size, fam.coords(exp.params),
                                        attrs, overwrite=overwrite)
            else:
                st = ResultStore(path)
                check_names({k: v.dims for k, v in arrays.items()}, {k: v.shape for k, v in arrays.items()},
                            list(cells[0]), fam.coords(exp.params), f"experiment {exp.name}")
                if st.exists and not overwrite:
                    diff = identity_diff(st.attrs.get("identity"), identity(exp.hash, spec))
                    if diff:
                        raise StoreIdentityError(f"{st.path} holds results of another identity ({'; '.join(diff)}); "
                                                 f"re-run with --overwrite or use another sweep name")
            if st.exists and not (overwrite and not create):
                held = {s: h.get("why", "") for s, h in st.leases.live_holders().items()}
                states = st.shard_states()
                pending = [s for s, ss in states.items() if ss.state != "done" and s not in held]
                if create:      # keep the xarray-facing ``verified`` flags in step with the checked records
                    st.sync_verified({s: ss for s, ss in states.items() if s not in held})
            else:
                held, pending = {}, list(range(n_shards))
            units.append(Unit(exp, spec, path, n_shards, pending, held, len(cells)))
    return units


def make_tasks(sweep_name: str, units: list[Unit], shards_per_task: int = 1, only_pending: bool = True,
               pack=None) -> list[Task]:
    """Group shards into tasks, per model (one model load per task), in experiment order.

    ``pack`` (model name → callable(work) → list of work lists, e.g. :meth:`bayesflip.cost.ModelCost.pack`)
    groups a model's shards by estimated time; models without one get ``shards_per_task`` each."""
    by_model: dict[str, list[tuple[str, int]]] = {}
    for u in units:
        shards = u.pending if only_pending else list(range(u.n_shards))
        by_model.setdefault(u.model.name, []).extend((u.experiment.name, s) for s in shards)
    tasks: list[Task] = []
    for model, work in by_model.items():
        if pack and model in pack:
            tasks.extend(Task(sweep_name, model, w) for w in pack[model](work))
            continue
        for i in range(0, len(work), shards_per_task):
            tasks.append(Task(sweep_name, model, work[i: i + shards_per_task]))
    return tasks


def write_manifest(sweep: SweepConfig, units: list[Unit], extra: dict | None = None,
                   results_dir: Path | None = None) -> Path:
    path = Path(results_dir or RESULTS_DIR) / sweep.name / "manifest.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:
        raise StoreIdentityError(f"{path}: unreadable manifest ({e}); move it away to start the sweep afresh") from None
    doc = {
        "sweep": sweep.name,
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": sweep.models,
        "experiments": {e.name: e.raw for e in sweep.experiments},
        "units": [{"experiment": u.experiment.name, "model": u.model.name, "store": f"{u.experiment.name}/{u.model.name}.zarr",
                   "n_shards": u.n_shards, "template": u.model.template} for u in units],
        "submissions": old.get("submissions", []),
    }
    if extra:
        doc["submissions"].append(extra)
    atomic_write_text(path, json.dumps(doc, indent=2, default=str))
    return path
