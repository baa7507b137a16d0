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
        self.in_sampler = 0         # calls made inside engine.sample_next (the per-step sampler)
        self.by_method: dict[str, int] = {}
        self._sampling = False

    @contextmanager
    def patch(self) -> Iterator["SyncCounter"]:
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

        from . import engine

        sampler = engine.sample_next
        for m, fn in saved.items():
            setattr(torch.Tensor, m, wrap(m, fn))

        def sampling(*a, **k):
            self._sampling = True
            try:
                return sampler(*a, **k)
            finally:
                self._sampling = False
        engine.sample_next = sampling
        try:
            yield self
        finally:
            for m, fn in saved.items():
                setattr(torch.Tensor, m, fn)
            engine.sample_next = sampler


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
    """``model.generate`` on the left-padded rows, exactly ``max_new_tokens`` each (EOS off, as the engine's)."""
    hf = getattr(model, "module", model)
    ids, mask = _left_padded(rows, pad_id, device)
    torch.manual_seed(seed)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                          eos_token_id=None, pad_token_id=pad_id, **kw)
    return out[:, ids.shape[1]:].tolist()


def bench_generate(lm, prompts: list[list[int]] | None = None, max_new_tokens: int = 32, n_prompts: int = 16,
                   repeats: int = 4) -> dict:
    """Engine vs HF generate on one batch; ``prompts`` are token ids (default: coin/number prompts).

    Both run once as warm-up, then ``repeats`` times each, alternating which goes first (so a
    drift of the machine's speed biases neither); the reported times are the fastest repeat of
    each (the least disturbed by other work on the machine), ``ratio_engine_over_hf`` = HF
    time / engine time from those; ``ratio_median_of_pairs`` is the median of the per-repeat
    ratios. Neither side stops at EOS: every row gets exactly ``max_new_tokens`` new tokens.
    """
    from .engine import Scorer

    tok = lm.tokenizer
    if prompts is None:
        from .prompts import encode_prompt

        texts = [f"Story {i}: I tossed a coin {i + 1} times and wrote down every result. The results were"
                 for i in range(n_prompts)]
        prompts = [encode_prompt(tok, t) for t in texts]
    sc = Scorer(lm, max_batch=len(prompts), max_padding=1.0, batch_tokens=10**9)
    seeds = list(range(len(prompts)))
    repeats = max(1, repeats)
    out: dict = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "batch": len(prompts),
                 "repeats": repeats, "device": str(lm.device)}
    new_tokens = len(prompts) * max_new_tokens
    for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
        counter = SyncCounter()
        t_eng: list[float] = []
        t_hf: list[float] = []
        steps = 0.0

        def run_engine():
            nonlocal steps
            calls0 = sc.stats.forward_calls
            t = _now()
            with counter.patch():
                res = sc.generate(prompts, max_new_tokens, seeds, temperature=temp, stop_at_eos=False)
            t_eng.append(_now() - t)
            steps = sc.stats.forward_calls - calls0  # prefill + decoding steps
            return res

        def run_hf():
            t = _now()
            res = hf_generate(lm.model, prompts, sc.pad_id, lm.device, max_new_tokens, temp > 0)
            t_hf.append(_now() - t)
            return res

        sc.generate(prompts, 2, seeds, temperature=temp, stop_at_eos=False)  # warm-up (same shapes)
        hf_generate(lm.model, prompts, sc.pad_id, lm.device, 2, temp > 0)
        for r in range(repeats):
            if r % 2 == 0:
                eng, ref = run_engine(), run_hf()
            else:
                ref, eng = run_hf(), run_engine()
        te, th = min(t_eng), min(t_hf)
        pairs = sorted(h / e for h, e in zip(t_hf, t_eng))
        per_step = repeats * max(1, max_new_tokens)
        res = {"engine_tokens_per_s": new_tokens / te, "hf_tokens_per_s": new_tokens / th,
               "ratio_engine_over_hf": th / te, "ratio_median_of_pairs": pairs[len(pairs) // 2],
               "engine_s": te, "hf_s": th, "engine_s_repeats": t_eng, "hf_s_repeats": t_hf,
               "engine_forward_calls": steps,
               "host_syncs_per_step": counter.total / per_step,
               "device_host_syncs_per_step": counter.on_device / per_step,
               "sampler_host_syncs_per_step": counter.in_sampler / per_step,
               "syncs_by_method": {k: v / repeats for k, v in counter.by_method.items()}}
        if mode == "greedy":
            same = sum(a == b for a, b in zip(eng, ref))
            res["greedy_rows_identical_to_hf"] = f"{same}/{len(prompts)}"
        out[mode] = res
    out["note"] = ("times: fastest of `repeats` alternating runs each; host syncs counted over the whole engine "
                   "generate call (tensor .cpu/.item/.tolist/.numpy/int/float/bool/index) per decoding step; "
                   "device_* counts only non-CPU tensors; sampler_* only inside engine.sample_next")
    return out
