"""Multi-process helpers for tensor-parallel backends (one process per TP rank).

* :func:`dist_env` — rank / world size / local rank from ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK)
  or from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), so ``srun`` tasks need no launcher;
  :func:`export_rendezvous` sets the env:// variables a SLURM task lacks and keeps those already set.
* :func:`rank_device` — ``cuda:LOCAL_RANK`` (CUDA_VISIBLE_DEVICES is left alone), or ``cpu``.
* :func:`init_distributed` — the process group (NCCL on CUDA, gloo on CPU) with DeepSpeed's CPU
  shared-memory all-reduce switched off (:func:`disable_shm_allreduce`).
* :func:`all_ok` / :func:`agree` — an error on any rank fails the shard on *all* ranks, with the
  same message, before the ranks enter the next collective (otherwise the healthy ranks hang in
  an all-reduce the failed rank never joins).
* :func:`from_writer` — rank 0 alone runs a step (lease / record decisions, store writes) and
  every rank gets its result, or raises its error, so all ranks go through the same shards.
* :func:`all_reduce_sum` / :func:`all_reduce_max` — sum / maximum of a tensor over ranks (attention
  mass over head shards).
* :func:`check_device` — a GPU job template on a node without CUDA fails at task start with
  one line, instead of a CPU run of a 70B model or a CUDA traceback much later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from ..errors import BayesflipError

T = TypeVar("T")


class DeviceError(BayesflipError, RuntimeError):
    """The node cannot run what the model / job template asks for."""


class RankFailure(BayesflipError, RuntimeError):
    """Some rank failed; raised identically on every rank so the shard fails everywhere the same way."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def _first(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return v
    return None


Hostnames = Callable[[str], list]    # a SLURM node list → its hosts (bayesflip.hpc.slurm.hostnames)


def _slurm_first_host(hostnames: Hostnames | None = None) -> str | None:
    """The first node of a multi-node SLURM job (rank 0's host), for MASTER_ADDR. A compressed node list
    (``node[1-3]``) is expanded by ``hostnames``, which the cluster layer passes in (the backends never
    call SLURM themselves: :func:`bayesflip.hpc.launch.SweepTask` calls ``export_rendezvous(slurm.hostnames)``
    first, so later calls find MASTER_ADDR set)."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes or int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1) <= 1:
        return None
    if "[" not in nodes:
        return nodes.split(",")[0]
    if hostnames is None:
        raise DeviceError(f"multi-node SLURM job ({nodes}) without MASTER_ADDR: set it, or call "
                          f"export_rendezvous(bayesflip.hpc.slurm.hostnames) before starting the ranks")
    hosts = hostnames(nodes)
    return hosts[0] if hosts else None


def dist_env(hostnames: Hostnames | None = None) -> DistEnv:
    """This process's place in the job: torchrun variables first, then SLURM's, else a single process.
    ``hostnames``: expands a compressed SLURM node list, needed only while MASTER_ADDR is unset."""
    rank = _first("RANK", "SLURM_PROCID")
    world = _first("WORLD_SIZE", "SLURM_NTASKS")
    local = _first("LOCAL_RANK", "SLURM_LOCALID")
    addr = _first("MASTER_ADDR") or _slurm_first_host(hostnames) or "127.0.0.1"
    port = _first("MASTER_PORT")
    if port is None:  # SLURM without a launcher: a port every task of the job derives the same way
        job = int(_first("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID") or 0)
        task = int(_first("SLURM_ARRAY_TASK_ID") or 0)
        port = str(20000 + (job * 131 + task) % 20000)
    return DistEnv(rank=int(rank or 0), world_size=int(world or 1), local_rank=int(local or 0),
                   master_addr=addr, master_port=int(port))


RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def export_rendezvous(hostnames: Hostnames | None = None) -> dict[str, str]:
    """Set the env:// rendezvous variables of this task for torch.distributed / DeepSpeed, keeping every one
    that is already set (by SLURM's launcher, submitit, torchrun or the site); returns the values in force.

    Missing ones come from :func:`dist_env` (RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK =
    SLURM_LOCALID, MASTER_ADDR = the job's first node, MASTER_PORT derived from the job id, the same on
    every task) and LOCAL_WORLD_SIZE = SLURM_NTASKS_PER_NODE (else WORLD_SIZE / SLURM_JOB_NUM_NODES).
    (submitit's ``TorchDistributedEnvironment.export()`` raises when one of them is already set.)
    ``hostnames``: see :func:`dist_env` (the cluster layer passes ``bayesflip.hpc.slurm.hostnames``)."""
    env = dist_env(hostnames)
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1)
    per_node = (os.environ.get("SLURM_NTASKS_PER_NODE") or "").split("(")[0]
    values = {"MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port), "RANK": str(env.rank),
              "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
              "LOCAL_WORLD_SIZE": per_node if per_node.isdigit() else str(max(1, env.world_size // max(1, nodes)))}
    for k, v in values.items():
        if os.environ.get(k) in (None, ""):
            os.environ[k] = v
    return {k: os.environ[k] for k in RENDEZVOUS_VARS}


def rank_device(env: DistEnv, want: str | None = None):
    """``cuda:LOCAL_RANK`` when CUDA is available (and not ``want='cpu'``), else ``cpu``.

    CUDA_VISIBLE_DEVICES is never modified: with all of a node's GPUs visible, rank r takes GPU r;
    with one GPU bound per task (``--gpus-per-task=1``) every rank sees its own as ``cuda:0``.
    """
    import torch

    if want is not None and torch.device(want).type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if want is not None and torch.device(want).type == "cuda":
            raise DeviceError(f"device {want!r} asked for, but this node has no CUDA device "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if env.local_rank < n:
        idx = env.local_rank
    elif n == 1:
        idx = 0
    else:
        raise DeviceError(f"rank {env.rank} has LOCAL_RANK {env.local_rank} but sees only {n} GPUs "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
                          f"give each node as many GPUs as TP ranks")
    torch.cuda.set_device(idx)
    return torch.device(f"cuda:{idx}")


def disable_shm_allreduce() -> None:
    """Keep DeepSpeed off its CPU shared-memory all-reduce kernel (``deepspeed_shm_comm``).

    On the CPU accelerator DeepSpeed JIT-builds that op when its comm backend starts and then
    routes ``inference_all_reduce`` through it; unless LOCAL_SIZE equals the world size its shared
    buffers are never set up and the first TP all-reduce segfaults (and builds need a compiler).
    Marking the op incompatible in ``deepspeed.ops.__compatible_ops__`` (a module-level dict that
    DeepSpeed consults in ``comm.torch.build_shm_op``) makes it fall back to
    ``torch.distributed.all_reduce`` on the process group (gloo on CPU). Must run before
    ``deepspeed.init_distributed``. No effect on CUDA (NCCL).
    """
    os.environ.setdefault("DS_BUILD_OPS", "0")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(env: DistEnv, device) -> None:
    """Start the process group once (NCCL on CUDA, gloo on CPU) through DeepSpeed."""
    import torch.distributed as dist

    if env.world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    disable_shm_allreduce()
    import deepspeed

    import datetime

    # a rank that dies inside a collective leaves its peers waiting: bound the wait (minutes)
    timeout = datetime.timedelta(minutes=float(os.environ.get("BAYESFLIP_DIST_TIMEOUT_MIN", "30")))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False, timeout=timeout)


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_ok(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (a MIN all-reduce); single process: ``flag``."""
    if not _active():
        return bool(flag)
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def agree(fn: Callable[[], T], what: str = "shard") -> T:
    """Run ``fn`` on every rank; if it raised on any rank, raise the same :class:`RankFailure` on all.

    Ranks exchange (ok, message) after ``fn``, so no rank proceeds to the next collective alone.
    The first failing rank's message is reported everywhere; single process: plain call.
    """
    err: BaseException | None = None
    out: Any = None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 — re-raised below, identically on all ranks
        err = e
    if not _active():
        if err is not None:
            raise err
        return out
    import torch.distributed as dist

    msgs: list = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}")
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        r, m = failed[0]
        raise RankFailure(f"{what} failed on rank {r} of {len(msgs)}: {m}") from err
    return out


def from_writer(fn: Callable[[], T], what: str = "decision") -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank (``broadcast_object_list``).

    An exception on rank 0 is raised on every rank (the same exception object when it pickles,
    else a :class:`RankFailure` with its message), so the other ranks never wait in a collective
    rank 0 will not reach. Single process: a plain call.
    """
    if not _active():
        return fn()
    import pickle

    import torch.distributed as dist

    payload: list = [None]
    err: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 — re-raised below on every rank
            err = e
            try:
                pickle.loads(pickle.dumps(e))
                payload[0] = ("err", e)
            except Exception:  # noqa: BLE001 — an exception that does not pickle travels as its message
                payload[0] = ("err", RankFailure(f"{what} failed on rank 0: {type(e).__name__}: {e}"))
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "err":
        raise (err if err is not None else value)
    return value


def _all_reduce(t, op: str):
    """``t`` reduced over ranks with ``op`` ("SUM" | "MAX"), in place on its own device; single process: ``t``."""
    if not _active():
        return t
    import torch.distributed as dist

    dev = t.device
    buf = t.to(_comm_device())
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, op))
    t.copy_(buf.to(dev))
    return t


def all_reduce_sum(t):
    """Sum ``t`` over ranks (in place, returned); single process: ``t``."""
    return _all_reduce(t, "SUM")


def all_reduce_max(t):
    """Element-wise maximum of ``t`` over ranks (in place, returned); single process: ``t``."""
    return _all_reduce(t, "MAX")


def check_device(spec: Any, template: Any) -> None:
    """Fail at task start, in one line, when the node cannot serve ``spec`` under ``template``.

    ``template``: the resolved job template, a :class:`~bayesflip.hpc.templates.JobTemplate` or a dict
    with ``name`` and ``gpus_per_node`` (the caller resolves names: :func:`bayesflip.hpc.launch.task_template`;
    the backends do not import the cluster layer).
    """
    import torch

    if template is None or isinstance(template, str):
        raise TypeError(f"check_device needs a resolved job template (JobTemplate or dict), not {template!r}")
    get = template.get if isinstance(template, dict) else (lambda k, d=None: getattr(template, k, d))
    name = get("name", "?")
    gpus = int(get("gpus_per_node", 0) or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if gpus > 0 and not torch.cuda.is_available():
        raise DeviceError(f"model {spec.name}: job template {name!r} asks for {gpus} GPU(s) per node, but this node "
                          f"has no usable CUDA device (torch.cuda.is_available() is False, "
                          f"CUDA_VISIBLE_DEVICES={visible}); check --gres/--gpus and the partition")
    tp = int(getattr(spec, "tp", 1) or 1)
    if gpus > 0 and tp > 1:
        env = dist_env()
        if env.world_size != tp:
            raise DeviceError(f"model {spec.name} is tensor-parallel over tp={tp} ranks, but this task runs "
                              f"{env.world_size} rank(s); job template {name!r} must start {tp} tasks "
                              f"(nodes x tasks_per_node)")
        if torch.cuda.device_count() <= env.local_rank and torch.cuda.device_count() != 1:
            raise DeviceError(f"model {spec.name}: rank {env.rank} (LOCAL_RANK {env.local_rank}) sees only "
                              f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES={visible})")
