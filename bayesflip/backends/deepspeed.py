"""``backend: deepspeed`` — tensor-parallel inference (AutoTP), one process per rank.

Each rank loads the checkpoint on the CPU (memory-mapped), ``deepspeed.init_inference`` shards
it and places the shard on ``cuda:LOCAL_RANK``. Every rank runs the same requests (the engine's
batching is deterministic), all ranks see the same reduced log-probs, and only rank 0
(:attr:`is_writer`) writes (:func:`bayesflip.job.run_task`: rank 0 takes the leases and writes
chunks and records, broadcasting its decisions). Attention mass: each rank sees its own heads;
the per-rank head means are combined, weighted by head counts, with a sum all-reduce, and the
per-key maxima over heads (``attention_stats``) with a max all-reduce.

Scored reads (``read_dtype: float32``, the default) use :class:`VocabParallelReadHead`: AutoTP cuts
the output layer along its input (hidden) dimension and all-reduces the full logits in the model's
dtype; instead, once at load, the ranks all-gather the layer's columns and each keeps the float32
rows of its slice of the vocabulary, so a forward all-reduces three vectors per read (max, sum of
exponentials, the wanted logits) instead of N × V bf16 logits. Generation keeps DeepSpeed's layer.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from ..engine import ReadHead
from . import ATTENTION_MASS
from .base import Backend
from .distributed import (DeviceError, DistEnv, agree, all_reduce_max, all_reduce_sum, dist_env, init_distributed,
                          rank_device)

T = TypeVar("T")


class VocabParallelReadHead(ReadHead):
    """Float32 read head over a DeepSpeed AutoTP output layer (``LmHeadLinearAllreduce``), vocabulary-parallel.

    Rank r holds ``W_r`` = the float32 rows ``v0_r:v1_r`` of the full output layer (even slices of the
    vocabulary) and computes ``z_r = h·W_rᵀ (+ b_r)`` for the read rows (the hidden states are the same
    on every rank). Then ``m = max_r max_v z_r`` (MAX all-reduce), ``s = Σ_r Σ_v exp(z_r − m)`` (SUM),
    ``lse = m + log s``; a wanted token's logit comes from the rank whose slice holds it (zero elsewhere,
    SUM all-reduce); ``log p = z[t] − lse``. Whatever the model applies after its output layer
    (element-wise, e.g. soft-capping) is applied to each rank's slice.
    """

    def __init__(self, module, group=None):
        import torch.distributed as dist

        super().__init__(module, float32=True)
        self.group = group
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        shard = module.weight.detach()                       # (V, H_r): this rank's input columns
        sizes = list(getattr(module, "_partition_sizes", [shard.shape[1]] * world))
        buf = torch.zeros((shard.shape[0], max(sizes)), dtype=shard.dtype, device=shard.device)
        buf[:, : shard.shape[1]] = shard
        bufs = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(bufs, buf, group=group)
        V = shard.shape[0]
        per = -(-V // world)
        self.v0, self.v1 = min(V, rank * per), min(V, (rank + 1) * per)
        self._w = torch.cat([b[self.v0: self.v1, : n] for b, n in zip(bufs, sizes)], dim=1).float().contiguous()
        bias = getattr(module, "bias", None)
        self._b = None if bias is None else bias.detach()[self.v0: self.v1].float()
        del bufs, buf

    def logits(self, h: torch.Tensor, base) -> torch.Tensor:
        assert self._w is not None   # gathered in __init__
        return torch.nn.functional.linear(h.float(), self._w, self._b)

    def logprobs(self, z: torch.Tensor, rows: torch.Tensor, toks: torch.Tensor, host_rows: np.ndarray | Sequence[int]) -> torch.Tensor:
        import torch.distributed as dist

        from ..engine import row_chunks

        z = z.float()
        m = z.amax(-1) if z.shape[1] else torch.full(z.shape[:1], float("-inf"), device=z.device)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        s = torch.zeros_like(m)
        for a, b, _, _ in row_chunks(host_rows, z.shape[0], max(1, z.shape[1])):
            s[a:b] = (z[a:b] - m[a:b, None]).exp().sum(-1)
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=self.group)
        lse = m + s.log()
        mine = (toks >= self.v0) & (toks < self.v1)
        picked = torch.where(mine, z[rows, (toks - self.v0).clamp(0, max(0, z.shape[1] - 1))], torch.zeros((), device=z.device))
        dist.all_reduce(picked, op=dist.ReduceOp.SUM, group=self.group)
        return picked - lse[rows]


def install_read_head(scorer, world_size: int) -> None:
    """A vocabulary-parallel float32 read head when the output layer is split over ``world_size > 1`` ranks
    and the model reads in float32 (``read_dtype: model`` keeps DeepSpeed's layer: bf16 all-reduced logits)."""
    head = scorer.module.get_output_embeddings()
    if world_size > 1 and scorer.read_dtype == "float32" and hasattr(head, "_partition_sizes"):
        scorer.read_head = VocabParallelReadHead(head, getattr(head, "mp_group", None))
    elif world_size > 1 and hasattr(head, "_partition_sizes"):
        scorer.read_head = ReadHead(head, float32=False)


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    CAPABILITIES = frozenset({ATTENTION_MASS})

    def __init__(self, lm, env: DistEnv, **scorer_kwargs):
        super().__init__(lm, **scorer_kwargs)
        self.env = env
        install_read_head(self.scorer, env.world_size)

    @classmethod
    def load(cls, spec, device: Any = None, dtype: str | None = None, **scorer_kwargs) -> "DeepSpeedBackend":
        from ..models.loader import load_model

        env = dist_env()
        if env.world_size != spec.tp:
            raise DeviceError(f"model {spec.name} is tensor-parallel over tp={spec.tp} ranks, but this process is one "
                              f"of {env.world_size} (WORLD_SIZE / SLURM_NTASKS); start it with tp tasks "
                              f"(`torchrun --nproc_per_node {spec.tp}` or a job template with {spec.tp} tasks)")
        dev = rank_device(env, device)
        init_distributed(env, dev)
        return cls(load_model(spec, device=dev, dtype=dtype), env, **scorer_kwargs)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def agree(self, fn: Callable[[], T], what: str = "shard") -> T:
        return agree(fn, what)

    def _local_heads(self, fn):
        """``fn()`` (one eager forward with attentions) and the number of heads this rank saw."""
        hf = getattr(self.model, "module", self.model)
        heads: list[int] = []

        def hook(_m, _a, out):
            att = getattr(out, "attentions", None)
            if att:
                heads.append(int(att[0].shape[1]))

        h = hf.register_forward_hook(hook)
        try:
            res = fn()
        finally:
            h.remove()
        return res, float(heads[-1])

    def attention_mass(self, ids, query_positions, key_groups, layers=None) -> dict[str, np.ndarray]:
        self.require(ATTENTION_MASS, "attention_mass")
        res, n = self._local_heads(lambda: self.scorer.attention_mass(ids, query_positions, key_groups, layers=layers))
        if self.world_size == 1:
            return res
        # per-rank means over local heads -> global mean over all heads: Σ_r n_r·mean_r / Σ_r n_r
        keys = list(res)
        flat = torch.tensor(np.concatenate([res[k] * n for k in keys] + [np.array([n])]), dtype=torch.float64)
        all_reduce_sum(flat)
        total = float(flat[-1])
        out, i = {}, 0
        for k in keys:
            out[k] = (flat[i: i + len(res[k])] / total).numpy()
            i += len(res[k])
        return out

    def attention_stats(self, ids, query_positions, key_groups, layers=None) -> dict[str, dict[str, np.ndarray]]:
        """Mean and max-over-heads-then-layers mass over *all* heads of the TP group.

        Each rank reduces its own heads per key (one group per key position); the means are
        combined weighted by head counts (sum all-reduce), the per-key maxima by a max all-reduce,
        and only then summed over each group's keys (a sum of per-rank group maxima would not be
        the maximum over all heads)."""
        self.require(ATTENTION_MASS, "attention_stats")
        if self.world_size == 1:
            return self.scorer.attention_stats(ids, query_positions, key_groups, layers)
        T, Q = len(ids), len(query_positions)
        per_key = {str(t): [t] for t in range(T)}
        res, n = self._local_heads(lambda: self.scorer.attention_stats(ids, query_positions, per_key, layers))
        mean = np.stack([res["mean"][str(t)] for t in range(T)], axis=1) * n          # (Q, T)
        flat = torch.tensor(np.concatenate([mean.ravel(), [n]]), dtype=torch.float64)
        all_reduce_sum(flat)
        mean_t = (flat[:-1] / flat[-1]).reshape(Q, T)
        mx = torch.tensor(np.stack([res["max"][str(t)] for t in range(T)], axis=1), dtype=torch.float64)
        all_reduce_max(mx)
        out: dict[str, dict[str, np.ndarray]] = {"mean": {}, "max": {}}
        for g, keys in key_groups.items():
            k = torch.tensor(list(keys), dtype=torch.long)
            for how, r in (("mean", mean_t), ("max", mx)):
                out[how][g] = (r[:, k].sum(-1) if len(k) else torch.zeros(Q, dtype=torch.float64)).numpy()
        return out
