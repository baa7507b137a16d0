"""Generation benchmark: the engine's ``generate`` vs transformers' ``model.generate``.

Same prompts, same batch (one batch, no length bucketing), same settings: greedy and sampled
(temperature 1, no top-k / top-p), exactly ``max_new_tokens`` new tokens per row (EOS ignored
on both sides). Reports tokens/s of each and their ratio, greedy agreement, and the number of
device→host synchronisations per decoding step in the engine, counted by :class:`SyncCounter`
(which wraps the tensor methods that block on the device: ``.cpu() .item() .tolist() .numpy()``
and ``int()/float()/bool()`` of a tensor) while the engine generates.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

SYNC_METHODS = ("cpu", "item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")


class SyncCounter:
    """Counts calls of the blocking tensor methods (all of them, and those on accelerator tensors)."""

    def __init__(self):
        self.total = 0
        self.on_device = 0          # calls on a non-CPU tensor: real device->host syncs
        self.in_sampler = 0         # calls made inside Scorer._sample (if the engine has one)
        self.by_method: dict[str, int] = {}
        self._sampling = False

    @contextmanager
    def patch(self) -> Iterator["SyncCounter"]:
        from .engine import Scorer

        saved = {m: getattr(torch.Tensor, m) for m in SYNC_METHODS if hasattr(torch.Tensor, m)}

        def wrap(name, fn):
            def counted(t, *a, **k):
                self.total += 1
                self.by_method[name] = self.by_method.get(name, 0) + 1
                if t.device.type != "cpu":
                    self.on_device += 1
                if self._sampling:
                    self.in_sampler += 1
                return fn(t, *a, **k)
            return counted

        sampler = Scorer.__dict__.get("_sample")
        for m, fn in saved.items():
            setattr(torch.Tensor, m, wrap(m, fn))
        if isinstance(sampler, staticmethod):
            inner = sampler.__func__

            def sampling(*a, **k):
                self._sampling = True
                try:
                    return inner(*a, **k)
                finally:
                    self._sampling = False
            Scorer._sample = staticmethod(sampling)
        try:
            yield self
        finally:
            for m, fn in saved.items():
                setattr(torch.Tensor, m, fn)
            if sampler is not None:
                Scorer._sample = sampler


def _now() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)


def hf_generate(model, rows: list[list[int]], pad_id: int, device, max_new_tokens: int, sample: bool,
                seed: int = 0) -> list[list[int]]:
    hf = getattr(model, "module", model)
    ids, mask = _left_padded(rows, pad_id, device)
    torch.manual_seed(seed)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                          min_new_tokens=max_new_tokens, pad_token_id=pad_id, **kw)
    return out[:, ids.shape[1]:].tolist()


def bench_generate(lm, prompts: list[list[int]] | None = None, max_new_tokens: int = 32, n_prompts: int = 16,
                   repeats: int = 1) -> dict:
    """Engine vs HF generate on one batch; ``prompts`` are token ids (default: coin/number prompts)."""
    from .engine import Scorer

    tok = lm.tokenizer
    if prompts is None:
        from .prompts import encode_prompt

        texts = [f"Story {i}: I tossed a coin {i + 1} times and wrote down every result. The results were"
                 for i in range(n_prompts)]
        prompts = [encode_prompt(tok, t) for t in texts]
    sc = Scorer(lm, max_batch=len(prompts), max_padding=1.0, batch_tokens=10**9)
    seeds = list(range(len(prompts)))
    out: dict = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "batch": len(prompts),
                 "device": str(lm.device)}
    new_tokens = len(prompts) * max_new_tokens
    for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
        sc.generate(prompts[:2], 2, seeds[:2], temperature=temp, stop_at_eos=False)  # warm-up
        counter = SyncCounter()
        calls0 = sc.stats.forward_calls
        t = _now()
        with counter.patch():
            for _ in range(repeats):
                eng = sc.generate(prompts, max_new_tokens, seeds, temperature=temp, stop_at_eos=False)
        t_eng = (_now() - t) / repeats
        steps = (sc.stats.forward_calls - calls0) / repeats  # prefill + decoding steps
        hf_generate(lm.model, prompts[:2], sc.pad_id, lm.device, 2, temp > 0)  # warm-up
        t = _now()
        for _ in range(repeats):
            ref = hf_generate(lm.model, prompts, sc.pad_id, lm.device, max_new_tokens, temp > 0)
        t_hf = (_now() - t) / repeats
        res = {"engine_tokens_per_s": new_tokens / t_eng, "hf_tokens_per_s": new_tokens / t_hf,
               "ratio_engine_over_hf": t_hf / t_eng, "engine_s": t_eng, "hf_s": t_hf,
               "engine_forward_calls": steps,
               "host_syncs_per_step": counter.total / repeats / max(1, max_new_tokens),
               "device_host_syncs_per_step": counter.on_device / repeats / max(1, max_new_tokens),
               "sampler_host_syncs_per_step": counter.in_sampler / repeats / max(1, max_new_tokens),
               "syncs_by_method": {k: v / repeats for k, v in counter.by_method.items()}}
        if mode == "greedy":
            same = sum(a == b for a, b in zip(eng, ref))
            res["greedy_rows_identical_to_hf"] = f"{same}/{len(prompts)}"
        out[mode] = res
    out["note"] = ("host syncs counted over the whole engine generate call (tensor .cpu/.item/.tolist/.numpy/"
                   "int/float/bool/index) per decoding step; device_* counts only non-CPU tensors")
    return out
