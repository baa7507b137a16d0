"""Float32 scored reads over a tensor-parallel (DeepSpeed AutoTP) output layer, vocabulary-parallel.

Used by :class:`bayesflip.backends.deepspeed.DeepSpeedBackend` (imported when a backend is built,
so that importing the backend class stays light). See that module's docstring for why.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..engine import ReadHead


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
        return torch.nn.functional.linear(h.float(), self._w, self._b)  # type: ignore[arg-type]  # bias None is allowed

    def logprobs(self, z: torch.Tensor, rows: torch.Tensor, toks: torch.Tensor,
                 host_rows: "np.ndarray | Sequence[int]") -> torch.Tensor:
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
