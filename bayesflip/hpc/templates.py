"""Job templates (``job_templates/<name>.yaml``): the resource class of a model's array tasks.

A template is a flat YAML mapping, validated by :class:`JobTemplate` (unknown keys and bad
values are errors naming the key)::

    partition: gpu          # SLURM partition (--partition overrides)
    nodes: 1
    tasks_per_node: 1       # = the model's tensor-parallel degree (nodes × tasks_per_node == tp)
    gpus_per_node: 1
    cpus_per_task: 8
    mem_gb: 64              # per node
    time_min: 240           # per task (--time overrides); >= 3 (submitit checkpoint rules)
    signal_delay_s: 120     # USR2 this long before the limit → checkpoint + requeue
    array_throttle: 16      # default %N of the array (--array-throttle overrides)
    shards_per_task: 8      # shards per array task when the planner cannot pack by time (--shards-per-task overrides)
    target_task_min: 30     # optional: pack shards into tasks of about this many minutes (model load included)
                            # from the throughput below; must be <= 0.75·time_min (margin for estimate errors)
    throughput:             # optional: figures of one task for a model of ref_params_b parameters
      score_tokens_per_s: 25000   # prompt tokens forwarded per second (scoring, prefill; one read per row)
      curve_tokens_per_s: 16000   # optional: tokens per second with every position read (Markov)
      gen_tokens_per_s: 2000      # generated tokens per second (batched decoding, all rows together)
      load_s: 90                  # seconds to load the model (weights from shared storage to the device)
      ref_params_b: 8             # billions of parameters the figures are for; scaled linearly by the model's
      dtype: bfloat16             # the dtype the figures are for (default bfloat16)
      float32: {score_tokens_per_s: .., gen_tokens_per_s: .., curve_tokens_per_s: ..}   # optional, measured
      small: {score_tokens_per_s: .., gen_tokens_per_s: .., ref_params_b: 0.135}         # optional, measured
      source: "how the figures were obtained"
    max_requeues: 3         # submitit max_num_timeout: time-outs tolerated per task
    account: null           # optional (--account / --qos override)
    qos: null
    constraint: null        # optional --constraint
    setup: []               # shell lines run before the task (module load ...)

:func:`check_against_partition` compares a template with what the partition really offers
(:func:`bayesflip.hpc.slurm.query_partition`: ``scontrol show partition`` + ``sinfo`` per node:
CPUs, memory, GPUs from Gres, MaxTime, MaxNodes) and refuses, naming the key, a template that
could never be scheduled.

Which template a model gets (:func:`template_for`): one whose ``nodes × tasks_per_node`` equals the
model's ``tp`` — ``--template`` (a comma-separated list: each name for the models whose ``tp`` fits it),
else the registry's ``template``, else the one template of the same kind that starts ``tp`` tasks.

Time-based packing (:mod:`bayesflip.hpc.cost`): with ``target_task_min`` and a throughput figure
(the template's ``throughput``, or a calibration file ``$BAYESFLIP_CACHE/throughput/<name>.json``
written by ``make gpu-check``, which wins), the planner fills each task with shards up to about
``target_task_min`` minutes of estimated work, so a model is loaded a handful of times per
sweep; an explicit ``--shards-per-task`` overrides the packing. Without them tasks hold
``shards_per_task`` shards. ``bayesflip plan --dry-run`` prints the estimates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import read_yaml_mapping, pydantic_error
from ..errors import ConfigError
from ..paths import TEMPLATE_DIR
from .slurm import PartitionInfo

# submitit counts any signal before min(0.8·T, T − 600 s) as a preemption and after it as a
# time-out; below 3 minutes a task cannot even load a model before its USR2 arrives.
MIN_TIME_MIN = 3


class KindRates(BaseModel):
    """Per-kind tokens/s of another model than the reference (``float32``: the reference size in float32;
    ``small``: a small model, with its own ``ref_params_b``)."""

    model_config = ConfigDict(extra="forbid")

    score_tokens_per_s: float = Field(gt=0)
    gen_tokens_per_s: float = Field(gt=0)
    curve_tokens_per_s: Optional[float] = Field(None, gt=0)
    ref_params_b: Optional[float] = Field(None, gt=0)


class Throughput(BaseModel):
    """Throughput of one array task of the template, for a model of ``ref_params_b`` billion parameters
    in ``dtype``, per kind of work: ``score_tokens_per_s`` (prompt tokens forwarded, one read per row),
    ``curve_tokens_per_s`` (every position read, the Markov shape; None: reads cost nothing extra),
    ``gen_tokens_per_s`` (sampled tokens, batched decoding).

    Time estimates (:func:`bayesflip.hpc.cost.kind_speed`) scale seconds per token linearly with the
    model's parameter count — through the ``small`` model's figures when given (small models are
    bound by kernel launches, not FLOPs: no faster per token than the small one), else through the
    origin; a model in another dtype uses the ``float32`` figures when measured, else on-paper
    factors (:data:`bayesflip.hpc.cost.FP32_SLOWDOWN`, GPU templates only)."""

    model_config = ConfigDict(extra="forbid")

    score_tokens_per_s: float = Field(gt=0)
    gen_tokens_per_s: float = Field(gt=0)
    load_s: float = Field(ge=0)
    ref_params_b: float = Field(gt=0)
    curve_tokens_per_s: Optional[float] = Field(None, gt=0)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    float32: Optional[KindRates] = None
    small: Optional[KindRates] = None
    source: str = ""

    @model_validator(mode="after")
    def _small_has_a_size(self) -> "Throughput":
        if self.small is not None and self.small.ref_params_b is None:
            raise ValueError("throughput.small needs its own ref_params_b")
        return self


class JobTemplate(BaseModel):
    """Resources of one array task (SLURM job) of a model. See the module docstring for keys."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    partition: str = Field(min_length=1)
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: int = Field(ge=1)
    time_min: int = Field(ge=MIN_TIME_MIN)
    signal_delay_s: int = Field(90, ge=10)
    array_throttle: int = Field(8, ge=1)
    shards_per_task: int = Field(4, ge=1)
    target_task_min: Optional[int] = Field(None, ge=1)
    throughput: Optional[Throughput] = None
    max_requeues: int = Field(3, ge=0)
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    setup: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _signal_before_end(self) -> "JobTemplate":
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(f"signal_delay_s ({self.signal_delay_s}) must be shorter than time_min·60 "
                             f"({self.time_min * 60})")
        if self.target_task_min is not None and self.target_task_min > 0.75 * self.time_min:
            raise ValueError(f"target_task_min ({self.target_task_min}) must leave a margin within time_min "
                             f"({self.time_min}): at most 0.75·time_min = {int(0.75 * self.time_min)}")
        return self

    @property
    def n_tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    def resources(self) -> dict:
        """The SLURM-facing part (what goes into the manifest)."""
        return self.model_dump(exclude={"description", "setup"})


def template_names(template_dir: Path = TEMPLATE_DIR) -> list[str]:
    return sorted(p.stem for p in Path(template_dir).glob("*.yaml"))


def _validate(raw: dict, source: str) -> JobTemplate:
    try:
        return JobTemplate(**raw)
    except ValidationError as err:
        first = err.errors()[0]
        extra = next((e for e in err.errors() if e["type"] == "extra_forbidden"), None)
        if extra is not None:           # an unknown key first, even when a required one is missing too
            key = ".".join(map(str, extra["loc"]))
            fields = Throughput.model_fields if key.startswith("throughput.") else JobTemplate.model_fields
            raise ConfigError(key, "unknown key", allowed=sorted(k for k in fields if k != "name"),
                              source=source) from None
        if first["type"] == "missing":
            raise ConfigError(".".join(map(str, first["loc"])), "required key missing", source=source) from None
        exc = pydantic_error(err, "", source)
        if first["type"] in ("model_type", "dict_type") and first["loc"] == ("throughput",):
            raise ConfigError("throughput", f"must be a mapping (got {first.get('input')!r})",
                              allowed=sorted(Throughput.model_fields), source=source) from None
        if not err.errors()[0]["loc"]:  # a model-level check (signal delay / target task time vs time)
            msg = err.errors()[0]["msg"].removeprefix("Value error, ")
            key = "target_task_min" if msg.startswith("target_task_min") else "signal_delay_s"
            raise ConfigError(key, msg, source=source) from None
        raise exc from None


def load_template(name: str, template_dir: Path = TEMPLATE_DIR) -> JobTemplate:
    """A template by name (a file stem of ``job_templates/``; a path such as ``../x/cpu-debug`` is refused)."""
    if name not in template_names(template_dir):
        path_like = "/" in name or "\\" in name or name.endswith(".yaml")
        raise ConfigError("template", f"{name!r} is a path: name a template, not a path" if path_like
                          else f"unknown job template {name!r}", allowed=template_names(template_dir))
    path = Path(template_dir) / f"{name}.yaml"
    raw = read_yaml_mapping(path)
    if "name" in raw:
        raise ConfigError("name", "unknown key (the name is the file name)", source=str(path))
    return _validate({**raw, "name": name}, str(path))


def template_for(spec, requested: Optional[str] = None, template_dir: Path = TEMPLATE_DIR) -> JobTemplate:
    """The job template of model ``spec``: one that starts ``spec.tp`` tasks (one per TP rank).

    In order: the first of ``requested`` (``--template``; a comma-separated list applies each name to
    the models whose ``tp`` equals its ``nodes × tasks_per_node``) that fits; the registry entry's
    ``template`` when it fits; else the one template of ``job_templates/`` that fits and is of the same
    kind (GPU or CPU) as the entry's, preferring its partition (so ``tp: 8`` on a model whose template
    has 4 tasks picks the 8-task GPU template without edits). None fits, or a tie: a ConfigError
    naming the templates that start ``tp`` tasks."""
    names = [n.strip() for n in (requested or "").split(",") if n.strip()]
    for name in names:
        t = load_template(name, template_dir)
        if t.n_tasks == spec.tp:
            return t
    own = load_template(spec.template, template_dir)
    if own.n_tasks == spec.tp:
        return own
    fits = [t for t in (load_template(n, template_dir) for n in template_names(template_dir)) if t.n_tasks == spec.tp]
    same = [t for t in fits if (t.gpus_per_node > 0) == (own.gpus_per_node > 0)]
    pick = [t for t in same if t.partition == own.partition] or same
    if len(pick) == 1:
        return pick[0]
    tried = ", ".join(names + [spec.template])
    raise ConfigError(f"models.{spec.name}.template",
                      f"model {spec.name} has tensor-parallel degree tp={spec.tp}, but {tried} start(s) "
                      f"{', '.join(str(load_template(n, template_dir).n_tasks) for n in names + [spec.template])} "
                      f"task(s) and {'several' if pick else 'no'} other {'GPU' if own.gpus_per_node else 'CPU'} "
                      f"template starts {spec.tp} (nodes × tasks_per_node = tp; name one with --template)",
                      allowed=[t.name for t in fits])


def templates_for(specs: list, requested: Optional[str] = None, template_dir: Path = TEMPLATE_DIR) -> dict[str, JobTemplate]:
    """:func:`template_for` of every model (name → template). A ``requested`` name that fits none of
    the models (its task count is no model's ``tp``) is an error: it was meant for some model."""
    out = {spec.name: template_for(spec, requested, template_dir) for spec in specs}
    for name in [n.strip() for n in (requested or "").split(",") if n.strip()]:
        if not any(t.name == name for t in out.values()):
            t = load_template(name, template_dir)
            raise ConfigError(f"job_templates/{name}.tasks_per_node (--template)",
                              f"--template {name} starts nodes × tasks_per_node = {t.n_tasks} task(s), the "
                              f"tensor-parallel degree of none of the models ("
                              + ", ".join(f"{sp.name}: tp={sp.tp}" for sp in specs) + ")",
                              allowed=sorted({sp.tp for sp in specs}))
    return out


def with_overrides(t: JobTemplate, **over) -> JobTemplate:
    """A copy with the CLI overrides (``None`` = keep), re-validated; errors name the CLI flag.
    A ``--time`` below the template's ``target_task_min`` / 0.75 lowers ``target_task_min`` to fit."""
    over = {k: v for k, v in over.items() if v is not None}
    if not over:
        return t
    if ("time_min" in over and "target_task_min" not in over and t.target_task_min
            and t.target_task_min > 0.75 * over["time_min"]):   # a shorter --time shortens the packing target too
        over["target_task_min"] = max(1, int(0.75 * over["time_min"]))
    flags = {"time_min": "--time", "array_throttle": "--array-throttle", "shards_per_task": "--shards-per-task",
             "target_task_min": "--target-task-min"}
    try:
        return _validate({**t.model_dump(), **over}, f"job template {t.name} + command-line overrides")
    except ConfigError as e:
        if e.key in flags:
            raise ConfigError(f"{e.key} ({flags[e.key]})", str(e).split(f"'{e.key}': ", 1)[-1]) from None
        raise


# ---------------------------------------------------------------------- partitions
def template_problems(t: JobTemplate, p: PartitionInfo) -> list[tuple[str, str]]:
    """(key, message) for every request of ``t`` that partition ``p`` cannot satisfy."""
    out = []
    where = f"partition {p.name!r}"
    if t.gpus_per_node > p.gpus_per_node:
        out.append(("gpus_per_node", f"asks for {t.gpus_per_node} GPU(s) per node; {where} nodes have at most "
                    f"{p.gpus_per_node} (Gres)"))
    if t.cpus_per_task * t.tasks_per_node > p.cpus_per_node:
        out.append(("cpus_per_task", f"asks for {t.cpus_per_task} CPU(s) × {t.tasks_per_node} task(s) per node; "
                    f"{where} nodes have at most {p.cpus_per_node} CPUs"))
    if t.mem_gb * 1024 > p.mem_mb_per_node:
        out.append(("mem_gb", f"asks for {t.mem_gb} GB per node; {where} nodes have at most "
                    f"{p.mem_mb_per_node / 1024:.1f} GB"))
    if p.max_time_min is not None and t.time_min > p.max_time_min:
        out.append(("time_min", f"asks for {t.time_min} min; {where} MaxTime is {p.max_time_min} min"))
    limit = min(p.total_nodes, p.max_nodes) if p.max_nodes is not None else p.total_nodes
    if t.nodes > limit:
        out.append(("nodes", f"asks for {t.nodes} node(s); {where} allows at most {limit}"))
    return out


def check_against_partition(t: JobTemplate, p: PartitionInfo) -> None:
    probs = template_problems(t, p)
    if probs:
        key, msg = probs[0]
        more = "; also " + "; ".join(f"{k}: {m}" for k, m in probs[1:]) if len(probs) > 1 else ""
        raise ConfigError(f"job_templates/{t.name}.{key}", msg + more)
