"""Generation benchmark: the engine's ``generate`` vs transformers' ``model.generate``.

Same prompts, same batch (one batch, no length bucketing), same settings: greedy and sampled
(temperature 1, no top-k / top-p), exactly ``max_new_tokens`` new tokens per row (EOS ignored
on both sides). Reports tokens/s of each and their ratio, greedy agreement, and the number of
device→host synchronisations per decoding step in the engine, counted by :class:`SyncCounter`
(which wraps the tensor methods that block on the device: ``.cpu() .item() .tolist()`` and
``int()/float()/bool()`` of a tensor) while the engine generates.

:func:`bench_generate_stops` is the job's own shape: sampled generation with two stop strings and
EOS on, the engine vs ``model.generate(stop_strings=...)`` on the same new tokens.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

# the tensor methods that block until the device has finished (``.numpy()`` is not one: it only works on
# CPU tensors, after the ``.cpu()`` that did the copy)
SYNC_METHODS = ("cpu", "item", "tolist", "__int__", "__float__", "__bool__", "__index__")


ENGINE_MODULES = ("bayesflip.engine",)


def _has_device(args: tuple, kwargs: dict) -> bool:
    """Whether a ``.to`` / ``torch.tensor`` call names a device (a host↔device copy on an accelerator)."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, torch.device) or (isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda", "mps", "xpu"))
               for a in args)


class SyncCounter:
    """Counts calls of the blocking tensor methods (all of them, and those on accelerator tensors),
    and the host↔device copies the engine issues.

    ``total`` / ``by_method``: every blocking call (``.cpu() .item() .tolist()``, ``int()``,
    ``float()``, ``bool()``, ``__index__``), wherever it is made (the engine or the model's own code);
    ``in_engine``: those made by the engine's own code; ``engine_transfers``: calls from the engine's code
    that name a device (``tensor.to(device)``, ``torch.tensor(..., device=...)``, ``torch.as_tensor``,
    ``.cuda()``) — each is a host→device copy on an accelerator, so the count means the same on the
    CPU, where the copies are free."""

    def __init__(self):
        self.total = 0
        self.on_device = 0          # calls on a non-CPU tensor: real device->host syncs
        self.in_sampler = 0         # calls made inside engine.sample_next (the per-step sampler)
        self.in_engine = 0          # blocking calls made by bayesflip.engine itself
        self.engine_transfers = 0   # host->device copies issued by bayesflip.engine
        self.by_method: dict[str, int] = {}
        self._sampling = False

    def per(self, n: int) -> dict:
        """The counts divided by ``n`` (forward passes or decoding steps)."""
        n = max(1, n)
        return {"host_syncs": self.total / n, "engine_host_syncs": self.in_engine / n,
                "engine_transfers": self.engine_transfers / n,
                "syncs_and_copies": (self.total + self.engine_transfers) / n}

    @contextmanager
    def patch(self) -> Iterator["SyncCounter"]:
        import sys

        saved = {m: getattr(torch.Tensor, m) for m in SYNC_METHODS if hasattr(torch.Tensor, m)}

        def from_engine() -> bool:
            return sys._getframe(2).f_globals.get("__name__") in ENGINE_MODULES

        def wrap(name, fn):
            def counted(t, *a, **k):
                self.total += 1
                self.by_method[name] = self.by_method.get(name, 0) + 1
                if t.device.type != "cpu":
                    self.on_device += 1
                if self._sampling:
                    self.in_sampler += 1
                if from_engine():
                    self.in_engine += 1
                return fn(t, *a, **k)
            return counted

        def wrap_copy(fn, method: bool):
            def counted(*a, **k):
                if from_engine() and (method and (_has_device(a[1:], k) or fn.__name__ == "cuda")
                                      or not method and k.get("device") is not None):
                    self.engine_transfers += 1
                return fn(*a, **k)
            return counted

        from . import engine

        sampler = engine.sample_next
        for m, fn in saved.items():
            setattr(torch.Tensor, m, wrap(m, fn))
        copies = {("Tensor", "to"): torch.Tensor.to, ("Tensor", "cuda"): torch.Tensor.cuda,
                  ("torch", "tensor"): torch.tensor, ("torch", "as_tensor"): torch.as_tensor}
        for (where, m), fn in copies.items():
            setattr(torch.Tensor if where == "Tensor" else torch, m, wrap_copy(fn, where == "Tensor"))

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
            for (where, m), fn in copies.items():
                setattr(torch.Tensor if where == "Tensor" else torch, m, fn)
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
                   "generate call (tensor .cpu/.item/.tolist/int/float/bool/index) per decoding step; "
                   "device_* counts only non-CPU tensors; sampler_* only inside engine.sample_next")
    return out


STOP_STRINGS = ("\n", ".")


def _stop_prompts(tok, n: int) -> list[list[int]]:
    from .prompts import encode_prompt

    subjects = ["coin", "die", "card", "number", "letter", "colour", "animal", "city"]
    return [encode_prompt(tok, f"Story {i}: I drew a random {subjects[i % len(subjects)]} {i + 2} times and "
                               f"wrote down every result. The results were") for i in range(n)]


def _trim(row: list[int], tok, stops: tuple, eos: int | None) -> list[int]:
    """``row`` up to and including its first EOS or the token that completes a stop string (the engine's cut)."""
    for j, t in enumerate(row):
        if t == eos or any(s in tok.decode(row[: j + 1]) for s in stops):
            return row[: j + 1]
    return row


class _Replay:
    """Logits processor that forces one token sequence per row (HF replays the engine's samples)."""

    def __init__(self, rows: list[list[int]], prompt_len: int, pad_id: int):
        self.rows, self.prompt_len, self.pad_id = rows, prompt_len, pad_id

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        want = torch.tensor([r[step] if step < len(r) else self.pad_id for r in self.rows], device=scores.device)
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, want.unsqueeze(1), 0.0)
        return forced


def bench_generate_stops(lm, n_prompts: int = 16, max_new_tokens: int = 48, repeats: int = 3,
                         stop_strings: tuple = STOP_STRINGS, prompts: list[list[int]] | None = None,
                         modes: tuple = ("sampled", "greedy"), hf_own: bool = True) -> dict:
    """Engine ``generate`` vs HF ``model.generate(stop_strings=...)``: sampled and greedy, two stop
    strings, EOS on, one batch of ``n_prompts``.

    The same new tokens on both sides: greedy rows are decoded independently by both (and must be
    identical); for sampling, HF replays the engine's sampled tokens through a logits processor that
    forces them (greedy over the forced scores), so both decode the same tokens and stop at the same
    steps; HF's own sampled run is timed too (``hf_own_sampling``: other tokens, other stopping
    steps, compared per new token; ``hf_own``). Times: fastest of ``repeats`` alternating runs each.
    ``ratio_engine_over_hf`` = HF seconds / engine seconds on the same tokens. ``prompts``: token ids
    (default: ``n_prompts`` story prompts); ``modes``: a subset of ("sampled", "greedy").
    """
    from transformers import LogitsProcessorList

    from .engine import Scorer

    tok = lm.tokenizer
    prompts = prompts or _stop_prompts(tok, n_prompts)
    sc = Scorer(lm, max_batch=len(prompts), max_padding=1.0, batch_tokens=10**9)
    seeds = list(range(len(prompts)))
    eos = tok.eos_token_id
    hf = getattr(lm.model, "module", lm.model)
    ids, mask = _left_padded(prompts, sc.pad_id, lm.device)
    out: dict = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "stop_strings": list(stop_strings),
                 "stop_at_eos": True, "repeats": repeats}

    def hf_run(sample: bool, replay: list[list[int]] | None = None, seed: int = 0):
        torch.manual_seed(seed)
        kw: dict[str, Any] = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        if replay is not None:
            kw = dict(do_sample=False, logits_processor=LogitsProcessorList([_Replay(replay, ids.shape[1], sc.pad_id)]))
        t = _now()
        with torch.inference_mode():
            res = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                              pad_token_id=sc.pad_id, stop_strings=list(stop_strings), tokenizer=tok, **kw)
        dt = _now() - t
        return [_trim(r, tok, stop_strings, eos) for r in res[:, ids.shape[1]:].tolist()], dt

    for mode, temp in (("sampled", 1.0), ("greedy", 0.0)):
        if mode not in modes:
            continue
        counter = SyncCounter()
        t_eng: list[float] = []
        t_hf: list[float] = []
        eng = ref = None

        def run_engine():
            calls0 = sc.stats.forward_calls
            t = _now()
            with counter.patch():
                res = sc.generate(prompts, max_new_tokens, seeds, temperature=temp, stop_strings=stop_strings,
                                  stop_at_eos=True)
            t_eng.append(_now() - t)
            out.setdefault(mode, {})["engine_forward_calls"] = sc.stats.forward_calls - calls0
            return res

        eng = run_engine()                                                   # warm-up (also HF's stop-string tables)
        hf_run(temp > 0, eng if temp > 0 else None)
        t_eng.clear()
        for r in range(repeats):
            if r % 2 == 0:
                eng = run_engine()
            ref, dt = hf_run(temp > 0, eng if temp > 0 else None)
            t_hf.append(dt)
            if r % 2 == 1:
                eng = run_engine()
        te, th = min(t_eng), min(t_hf)
        assert eng is not None and ref is not None   # set by the repeats (min above: at least one)
        new = sum(map(len, eng))
        steps = max(map(len, eng))
        res = out[mode]
        res.update({"new_tokens": new, "hf_new_tokens": sum(map(len, ref)), "decoding_steps": steps,
                    "engine_s": te, "hf_s": th, "engine_s_repeats": t_eng, "hf_s_repeats": t_hf,
                    "ratio_engine_over_hf": th / te, "engine_tokens_per_s": new / te, "hf_tokens_per_s": new / th,
                    "host_syncs_per_step": counter.total / (repeats * max(1, steps)),
                    "tokens_identical_to_hf": f"{sum(a == b for a, b in zip(eng, ref))}/{len(prompts)}",
                    "new_tokens_per_row": [len(r) for r in eng]})
        if mode == "greedy":
            res["greedy_rows_identical_to_hf"] = res.pop("tokens_identical_to_hf")
        elif hf_own:
            own, dt_own = min((hf_run(True, seed=s) for s in range(repeats)), key=lambda x: x[1])
            n_own = sum(map(len, own))
            res["hf_own_sampling"] = {"new_tokens": n_own, "hf_s": dt_own, "hf_tokens_per_s": n_own / dt_own,
                                      "ratio_engine_over_hf_per_token": (new / te) / (n_own / dt_own)}
    out["note"] = ("same new tokens on both sides (greedy: decoded by both; sampled: HF replays the engine's tokens); "
                   "HF keeps decoding finished rows until every row has stopped, the engine drops them")
    return out
