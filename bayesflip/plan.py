"""Plan a sweep: models × experiments → stores (created up front) → shards → tasks.

Stores are created by the planner, before anything runs or is submitted, so that array
tasks never race to create them; every check that can fail (configs, model names,
tokenization of choices, empty grids, store identity) runs here, before submission.
``plan_sweep(..., create=False)`` plans without writing anything (dry runs, and the
array-size checks that must pass before any store is created). A shard is pending when it
is not verified done (see :mod:`bayesflip.store`) and no live job holds its lease.

What crosses into a job is a :class:`TaskPlan`: the resolved experiment configs, the model's
:class:`~bayesflip.models.registry.ModelSpec` and the (experiment, shard) pairs, so a job (in-process
or a pickled SLURM array task) never looks a sweep or a model up by name again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .config import ExperimentConfig, SweepConfig, load_sweep
from .errors import ConfigError, StoreIdentityError
from .experiments import get_family
from .hpc import slurm
from .hpc.manifest import Manifest, ManifestError, PlannedUnit, Submission
from .hpc.status import active_jobs
from .models.registry import ModelSpec, get_model_spec
from .paths import RESULTS_DIR
from .store import ResultStore, identity, identity_diff, provenance, store_path
from .store_layout import check_names


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


@dataclass(frozen=True)
class TaskPlan:
    """What one job (array task) runs: load ``model`` once, run these (experiment, shard) pairs.

    Everything is resolved: ``experiments`` holds the config of every experiment of ``work`` (as the
    planner saw it), ``model`` the registry entry. Submit pickles it into the array task; ``debug``
    hands it to :class:`bayesflip.job.ShardRunner` in-process. ``results_dir`` None: the default."""

    sweep: str
    model: ModelSpec
    experiments: dict[str, ExperimentConfig]
    work: list[tuple[str, int]]
    results_dir: Optional[Path] = None

    @classmethod
    def resolve(cls, sweep: str, model: str, work: Iterable[tuple[str, int]],
                results_dir: Path | str | None = None) -> "TaskPlan":
        """From names (scripts, tests, and array tasks pickled by an older bayesflip): the sweep is
        loaded once here; an experiment the sweep no longer has is refused (nothing written)."""
        sw = load_sweep(sweep, model_type=model)
        exps = {e.name: e for e in sw.experiments}
        pairs = [(str(e), int(s)) for e, s in work]
        for e, _ in pairs:
            if e not in exps:
                raise StoreIdentityError(f"experiment {e!r} is no longer in sweep {sweep!r}; nothing written")
        return cls(sw.name, get_model_spec(model), {e: exps[e] for e, _ in pairs},
                   pairs, Path(results_dir) if results_dir else None)

    def store(self, experiment: str) -> Path:
        return store_path(self.sweep, experiment, self.model.name, self.results_dir)

    def work_json(self) -> list[list]:
        return [list(w) for w in self.work]


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


def probe_cells(cells: list[dict]) -> list[dict]:
    """The cells whose inputs are likely the longest: the first, the last, and for every numeric
    coordinate the first cell holding its largest value (a few cells, whatever the grid's size)."""
    out = {0: cells[0], len(cells) - 1: cells[-1]}
    for key, v in cells[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and key != "sample":
            def size(j: int, key: str = key) -> float:
                v = cells[j].get(key)
                return float(v) if isinstance(v, (int, float)) else float("-inf")

            i = max(range(len(cells)), key=size)
            out.setdefault(i, cells[i])
    return [out[i] for i in sorted(out)]


def check_context(fam, exp: ExperimentConfig, spec: ModelSpec, cells: list[dict], tokenizer,
                  contexts: dict[str, int]) -> None:
    """Refuse an experiment whose longest input (:meth:`Family.longest_input` on :func:`probe_cells`)
    exceeds the model's context (:func:`bayesflip.models.loader.context_length`, cached in ``contexts``):
    the engine never truncates, so the job would fail on every such shard."""
    from .models.loader import context_length

    try:
        n = fam.longest_input(exp.params, probe_cells(cells), tokenizer, spec.kind, exp.seed)
    except NotImplementedError:   # a family that cannot render its inputs: checked by the engine at run time
        return
    if spec.name not in contexts:
        contexts[spec.name] = context_length(spec)
    if n > contexts[spec.name]:
        raise ConfigError(f"experiments.{exp.name}.params", f"the longest input is {n} tokens, longer than "
                          f"{spec.name}'s context of {contexts[spec.name]} tokens (nothing is truncated); shorten "
                          f"the prompts (n_flips, lengths, ...) or use a model with a longer context")


def plan_sweep(sweep: SweepConfig, overwrite: bool = False, validate: bool = True,
               results_dir: Path | None = None, create: bool = True, warn=None,
               cells_cache: dict | None = None, tokenizers: dict | None = None) -> list[Unit]:
    """Every (experiment, model) unit with its pending shards; creates the stores unless ``create=False``.

    ``cells_cache`` (experiment name → cells) lets a second planning pass reuse the grids of the first.
    ``tokenizers`` (model name → tokenizer) are used for validation instead of loading them; a model
    mapped to None is not validated (a dry run costing an unprepared Hub model with a proxy tokenizer)."""
    cells_cache = {} if cells_cache is None else cells_cache
    tokenizers = dict(tokenizers or {})
    contexts: dict[str, int] = {}
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
                check_context(fam, exp, spec, cells, tokenizers[spec.name], contexts)
            path = store_path(sweep.name, exp.name, spec.name, results_dir)
            n_shards = (len(cells) + exp.shard_size - 1) // exp.shard_size
            if create:
                attrs = provenance(exp, spec)
                if (ev := fam.evidence(exp.params)) is not None:   # the cells' evidence kind, read by reduce
                    attrs["evidence"] = ev
                st = ResultStore.create(path, arrays, cells, exp.shard_size, fam.coords(exp.params),
                                        attrs, overwrite=overwrite, live_jobs=slurm.live_jobs)
            else:
                st = ResultStore(path, slurm.live_jobs)
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


def refuse_busy_overwrite(sweep: SweepConfig, results_dir: Path | str | None = None) -> None:
    """``--overwrite`` deletes stores: never while a job or process of the sweep still works on them."""
    root = Path(results_dir or RESULTS_DIR)
    units = plan_sweep(sweep, overwrite=True, results_dir=root, create=False)
    busy = active_jobs(sweep.name, root, [(u.experiment.name, u.store) for u in units])
    if busy:
        raise ConfigError("--overwrite", f"{len(busy)} job(s)/process(es) of sweep {sweep.name} are still active "
                          f"({'; '.join(busy[:5])}); wait for them or stop them first")


def make_tasks(sweep_name: str, units: list[Unit], shards_per_task: int = 1, only_pending: bool = True,
               pack=None, results_dir: Path | str | None = None) -> list[TaskPlan]:
    """Group shards into tasks, per model (one model load per task), in experiment order.

    ``pack`` (model name → callable(work) → list of work lists, e.g. :meth:`bayesflip.hpc.cost.ModelCost.pack`)
    groups a model's shards by estimated time; models without one get ``shards_per_task`` each."""
    by_model: dict[str, list[tuple[str, int]]] = {}
    specs: dict[str, ModelSpec] = {}
    exps: dict[str, ExperimentConfig] = {}
    for u in units:
        shards = u.pending if only_pending else list(range(u.n_shards))
        by_model.setdefault(u.model.name, []).extend((u.experiment.name, s) for s in shards)
        specs.setdefault(u.model.name, u.model)
        exps.setdefault(u.experiment.name, u.experiment)
    root = Path(results_dir) if results_dir else None

    def task(model: str, work: list[tuple[str, int]]) -> TaskPlan:
        return TaskPlan(sweep_name, specs[model], {e: exps[e] for e, _ in work}, list(work), root)

    tasks: list[TaskPlan] = []
    for model, work in by_model.items():
        if pack and model in pack:
            tasks.extend(task(model, w) for w in pack[model](work))
            continue
        for i in range(0, len(work), shards_per_task):
            tasks.append(task(model, work[i: i + shards_per_task]))
    return tasks


def write_manifest(sweep: SweepConfig, units: list[Unit], submission: Optional[Submission] = None,
                   results_dir: Path | str | None = None) -> Path:
    """Record the plan (models, resolved configs, units) in the sweep's manifest, keeping its submissions,
    plus ``submission`` when given. An unreadable manifest is refused, never overwritten."""
    try:
        with Manifest.edit(sweep.name, results_dir) as m:
            m.models = list(sweep.models)
            m.experiments = {e.name: e.raw for e in sweep.experiments}
            m.units = [PlannedUnit(experiment=u.experiment.name, model=u.model.name,
                                   store=f"{u.experiment.name}/{u.model.name}.zarr", n_shards=u.n_shards,
                                   template=u.model.template) for u in units]
            if submission is not None:
                m.submissions.append(submission)
    except ManifestError as e:
        raise StoreIdentityError(f"{e}; move it away to start the sweep afresh") from None
    return Manifest.path(sweep.name, results_dir)
