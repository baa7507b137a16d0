"""``backend: deepspeed`` — tensor-parallel inference (AutoTP), one process per rank.

Each rank loads the checkpoint on the CPU (memory-mapped), ``deepspeed.init_inference`` shards
it and places the shard on ``cuda:LOCAL_RANK``. Every rank runs the same requests (the engine's
batching is deterministic), all ranks see the same reduced log-probs, and only rank 0
(:attr:`is_writer`) writes (:func:`bayesflip.job.run_task`: rank 0 takes the leases and writes
chunks and records, broadcasting its decisions). Attention mass: each rank sees its own heads;
the per-rank head means are combined, weighted by head counts, with a sum all-reduce, and the
per-key maxima over heads (``attention_stats``) with a max all-reduce.

Placement: :meth:`DeepSpeedBackend.load` has the loader read the checkpoint on the CPU and
places it itself (:func:`deepspeed_wrap`); ``tp > 1`` is accepted (``TENSOR_PARALLEL``),
``device_map`` is not. Importing this module is light (torch and DeepSpeed are imported on load).

Scored reads (``read_dtype: float32``, the default) use
:class:`~bayesflip.backends.vocab_head.VocabParallelReadHead`: AutoTP cuts
the output layer along its input (hidden) dimension and all-reduces the full logits in the model's
dtype; instead, once at load, the ranks all-gather the layer's columns and each keeps the float32
rows of its slice of the vocabulary, so a forward all-reduces three vectors per read (max, sum of
exponentials, the wanted logits) instead of N × V bf16 logits. Generation keeps DeepSpeed's layer.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import numpy as np

from . import ATTENTION_MASS
from .base import Backend
from .distributed import (DeviceError, DistEnv, agree, all_reduce_max, all_reduce_sum, dist_env, disable_shm_allreduce,
                          init_distributed, rank_device)

T = TypeVar("T")


def deepspeed_wrap(model, tp: int, torch_dtype):
    """``deepspeed.init_inference`` with tensor parallelism ``tp``.

    The model arrives on the CPU; init_inference shards it (AutoTP) and moves each rank's shard
    to the current accelerator device (``cuda:LOCAL_RANK``, set by the backend). The process group
    must already be up when ``tp > 1`` (:func:`bayesflip.backends.distributed.init_distributed`).
    """
    disable_shm_allreduce()
    import deepspeed

    engine = deepspeed.init_inference(model, dtype=torch_dtype, tensor_parallel={"tp_size": tp},
                                      replace_with_kernel_inject=False)
    engine.eval()
    return engine


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    CAPABILITIES = frozenset({ATTENTION_MASS})
    TENSOR_PARALLEL = True

    def __init__(self, lm, env: DistEnv, **scorer_kwargs):
        from .vocab_head import install_read_head

        super().__init__(lm, **scorer_kwargs)
        self.env = env
        install_read_head(self.scorer, env.world_size)

    @classmethod
    def wrap(cls, lm, **scorer_kwargs) -> "DeepSpeedBackend":
        return cls(lm, dist_env(), **scorer_kwargs)

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
        def place(model, torch_dtype, device):      # the loader reads on the CPU; AutoTP shards onto dev
            return deepspeed_wrap(model, spec.tp, torch_dtype), device

        return cls(load_model(spec, device=dev, dtype=dtype, place=place), env, **scorer_kwargs)

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
        import torch

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
        import torch

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
