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
      score_tokens_per_s: 25000   # prompt tokens forwarded per second (scoring, prefill)
      gen_tokens_per_s: 2000      # generated tokens per second (batched decoding, all rows together)
      load_s: 90                  # seconds to load the model (weights from shared storage to the device)
      ref_params_b: 8             # billions of parameters the figures are for; scaled linearly by the model's
      source: "how the figures were obtained"
    max_requeues: 3         # submitit max_num_timeout: time-outs tolerated per task
    account: null           # optional (--account / --qos override)
    qos: null
    constraint: null        # optional --constraint
    setup: []               # shell lines run before the task (module load ...)

:func:`check_against_partition` compares a template with what the partition really offers
(``scontrol show partition`` + ``sinfo`` per node: CPUs, memory, GPUs from Gres, MaxTime,
MaxNodes) and refuses, naming the key, a template that could never be scheduled.

Time-based packing (:mod:`bayesflip.cost`): with ``target_task_min`` and a throughput figure
(the template's ``throughput``, or a calibration file ``$BAYESFLIP_CACHE/throughput/<name>.json``
written by ``make gpu-check``, which wins), the planner fills each task with shards up to about
``target_task_min`` minutes of estimated work, so a model is loaded a handful of times per
sweep; an explicit ``--shards-per-task`` overrides the packing. Without them tasks hold
``shards_per_task`` shards. ``bayesflip plan --dry-run`` prints the estimates.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import read_yaml_mapping, pydantic_error
from ..errors import ConfigError
from ..paths import TEMPLATE_DIR

# submitit counts any signal before min(0.8·T, T − 600 s) as a preemption and after it as a
# time-out; below 3 minutes a task cannot even load a model before its USR2 arrives.
MIN_TIME_MIN = 3


class Throughput(BaseModel):
    """Throughput of one array task of the template, for a model of ``ref_params_b`` billion parameters.

    Time estimates scale every figure linearly with the model's parameter count
    (:func:`bayesflip.cost.model_speed`): scoring is compute-bound (≈ 2·N FLOP per token),
    batched decoding and loading are bound by reading N weights."""

    model_config = ConfigDict(extra="forbid")

    score_tokens_per_s: float = Field(gt=0)
    gen_tokens_per_s: float = Field(gt=0)
    load_s: float = Field(ge=0)
    ref_params_b: float = Field(gt=0)
    source: str = ""


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
@dataclass
class PartitionInfo:
    """What one partition offers per node (max over its nodes) and per job."""

    name: str
    state: str
    max_time_min: Optional[int]      # None = UNLIMITED
    max_nodes: Optional[int]         # None = UNLIMITED
    total_nodes: int
    cpus_per_node: int
    mem_mb_per_node: int
    gpus_per_node: int


def slurm_available() -> bool:
    return shutil.which("sinfo") is not None and shutil.which("sbatch") is not None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError("partition", f"cannot query SLURM ({' '.join(cmd)}): {e}") from None


def parse_slurm_time(text: str) -> Optional[int]:
    """SLURM durations → minutes (rounded up): ``[D-]HH:MM:SS``, ``D-HH[:MM]``, ``MM:SS``, ``MM``.
    ``UNLIMITED``/``INFINITE``/``NONE`` → None."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(x) for x in text.split(":")] + [0] * (3 - len(text.split(":")))
        h, m, s = parts[:3]
    else:
        parts = [int(x) for x in text.split(":")]
        if len(parts) == 3:
            h, m, s = parts
        elif len(parts) == 2:
            h, (m, s) = 0, parts
        else:
            h, m, s = 0, parts[0], 0
    return days * 1440 + h * 60 + m + (1 if s else 0)


def parse_gres_gpus(gres: str) -> int:
    """GPU count of a node's Gres string, e.g. ``gpu:a100:4(S:0-1),shard:8`` → 4; ``(null)`` → 0."""
    n = 0
    for item in re.split(r",(?![^()]*\))", gres or ""):
        item = re.sub(r"\(.*\)", "", item).strip()
        if not item.startswith("gpu"):
            continue
        last = item.split(":")[-1]
        n += int(last) if last.isdigit() else 1
    return n


def _scontrol_fields(line: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)


def partition_names() -> list[str]:
    out = _run(["sinfo", "-h", "-o", "%R"])
    return sorted(set(out.stdout.split()))


def query_partition(name: str, key: str = "partition") -> PartitionInfo:
    """Read a partition's limits and its nodes' resources from the running SLURM."""
    sc = _run(["scontrol", "show", "partition", name, "-o"])
    if sc.returncode != 0 or not sc.stdout.strip():
        raise ConfigError(key, f"unknown partition {name!r} ({(sc.stderr or sc.stdout).strip()})",
                          allowed=partition_names())
    f = _scontrol_fields(sc.stdout)
    nodes = _run(["sinfo", "-h", "-N", "-p", name, "-o", "%N|%c|%m|%G"])
    if nodes.returncode != 0:
        raise ConfigError("partition", f"sinfo failed for partition {name!r}: {nodes.stderr.strip()}")
    cpus, mems, gpus, names = [0], [0], [0], set()
    for line in nodes.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        names.add(parts[0])
        cpus.append(int(re.sub(r"\D", "", parts[1]) or 0))
        mems.append(int(re.sub(r"\D", "", parts[2]) or 0))
        gpus.append(parse_gres_gpus(parts[3]))
    cpu, mem = max(cpus), max(mems)
    if f.get("MaxCPUsPerNode", "UNLIMITED").isdigit():
        cpu = min(cpu, int(f["MaxCPUsPerNode"]))
    if f.get("MaxMemPerNode", "UNLIMITED").isdigit():
        mem = min(mem, int(f["MaxMemPerNode"]))
    max_nodes = f.get("MaxNodes", "UNLIMITED")
    return PartitionInfo(name=name, state=f.get("State", "?"), max_time_min=parse_slurm_time(f.get("MaxTime", "")),
                         max_nodes=int(max_nodes) if max_nodes.isdigit() else None,
                         total_nodes=int(f.get("TotalNodes", len(names)) or len(names)),
                         cpus_per_node=cpu, mem_mb_per_node=mem, gpus_per_node=max(gpus))


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
