"""The one scoring engine every experiment family uses.

Narrow interface (in the spirit of lm-evaluation-harness's ``loglikelihood`` /
``generate_until``), at the token level:

* :meth:`Scorer.score_choices` — for a context and K choices, each choice's summed
  token log-prob ``log p(c | ctx) = Σ_t log softmax(logits[t-1])[token_t]`` (float32).
  The context is computed **once**; multi-token choices branch from its KV cache, and
  choices sharing leading tokens (`` 1``..`` 6`` → ``Ġ`` + digit) share those rows too.
* :meth:`Scorer.score_curves` — for one token sequence and a list of read positions, the
  choice log-probs at every position from a **single forward pass** (ICL learning
  curves, Markov chains). Position ``p`` reads ``logits[p]``, the prediction for token
  ``p+1``. A multi-token choice is read from the same pass when its leading tokens are the
  sequence's own next tokens; otherwise it branches from the cache (last position) or is
  scored as a separate context (rare; counted in ``stats.fallback_contexts``).
* :meth:`Scorer.generate` — seeded sampling on the model's device (one ``torch.Generator`` per
  row, so a row's sample does not depend on the other rows of its batch; temperature, top-k,
  top-p, inverse-CDF draw; only the sampled ids come back to the host).

Batches are length-sorted and right-padded, with attention masks and explicit position
ids; only the logits at the positions that are read are computed (``logits_to_keep``).
Sequences longer than the model's context raise :class:`ContextLengthError`; nothing is
ever truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from .errors import ContextLengthError

Ids = list[int]


@dataclass
class ChoiceRequest:
    context: Ids
    choices: list[Ids]


@dataclass
class CurveRequest:
    ids: Ids
    positions: list[int]
    choices: list[Ids]


@dataclass
class EngineStats:
    forward_calls: int = 0
    real_tokens: int = 0        # tokens of real text fed through the model
    padded_slots: int = 0       # batch slots filled with padding
    fallback_contexts: int = 0  # curve reads that needed their own context pass

    @property
    def padding_fraction(self) -> float:
        tot = self.real_tokens + self.padded_slots
        return self.padded_slots / tot if tot else 0.0

    def reset(self) -> None:
        self.forward_calls = self.real_tokens = self.padded_slots = self.fallback_contexts = 0


def _batches(lengths: Sequence[int], batch_tokens: int, max_batch: int, max_padding: float = 0.1) -> list[list[int]]:
    """Indices grouped into batches, longest first.

    A batch is cut when ``rows · max_len > batch_tokens``, when it has ``max_batch`` rows, or
    when adding the next row would make its padded fraction ``Σ(max_len − len) / (rows · max_len)``
    exceed ``max_padding`` — so every batch (and the whole run) wastes at most that fraction.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        if cur:
            width = lengths[cur[0]]
            rows = len(cur) + 1
            pad = (rows * width - real - lengths[i]) / (rows * width)
            if rows * width > batch_tokens or len(cur) >= max_batch or pad > max_padding:
                out.append(cur)
                cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    if cur:
        out.append(cur)
    return out


def _maximal_prefixes(seqs: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Unique sequences that are not a proper prefix of another one (rows to run)."""
    uniq = sorted(set(s for s in seqs if s), key=len, reverse=True)
    keep: list[tuple[int, ...]] = []
    for s in uniq:
        if not any(k[: len(s)] == s for k in keep):
            keep.append(s)
    return keep


def _branch_plan(choices: Sequence[Ids]):
    """Continuation rows for multi-token choices after a shared context.

    rows = maximal unique ``c[:-1]`` prefixes; a choice ``c`` (len m>1) is assigned to a row
    starting with ``c[:-1]``, whose logits at offsets 0..m-2 give ``c[1..m-1]``.
    Returns (rows, row_wants, assign) with ``assign[k]`` the row of choice k.
    """
    rows = _maximal_prefixes(tuple(c[:-1]) for c in choices)
    row_wants = [[_Want(t, []) for t in range(len(r))] for r in rows]
    assign: dict[int, int] = {}
    for k, c in enumerate(choices):
        if len(c) == 1:
            continue
        j = next(j for j, r in enumerate(rows) if r[: len(c) - 1] == tuple(c[:-1]))
        assign[k] = j
        for t in range(1, len(c)):
            if c[t] not in row_wants[j][t - 1].tokens:
                row_wants[j][t - 1].tokens.append(c[t])
    return rows, row_wants, assign


def _branch_sum(c: Ids, first: float, row_wants: list["_Want"] | None) -> float:
    lp = first
    for t in range(1, len(c)):
        lp += row_wants[t - 1].out[c[t]]  # type: ignore[index]
    return lp


@dataclass
class _Want:
    """Gather log-probs of ``tokens`` at sequence position ``pos`` of a row."""

    pos: int
    tokens: list[int]
    out: dict = field(default_factory=dict)  # token -> logprob


class Scorer:
    """Scoring engine bound to one loaded model (load once per job, score many cells)."""

    def __init__(self, lm, batch_tokens: int = 8192, max_batch: int = 64, progress: bool = False,
                 max_padding: float = 0.1):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.device = lm.device
        self.max_length = lm.max_length
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        self.max_padding = max_padding
        self.progress = progress
        self.stats = EngineStats()
        tok = self.tokenizer
        self.pad_id = next(x for x in (tok.pad_token_id, tok.eos_token_id, 0) if x is not None)

    # ------------------------------------------------------------------ model facts (families read these)
    @property
    def module(self):
        """The transformers module (a DeepSpeed InferenceEngine is unwrapped)."""
        return getattr(self.model, "module", self.model)

    @property
    def config(self):
        """The model's (text) config."""
        cfg = self.module.config
        return getattr(cfg, "text_config", None) or cfg

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def generation_config(self):
        """The model's ``generation_config`` (``generation: model_defaults`` reads it), or None."""
        return getattr(self.module, "generation_config", None)

    # ------------------------------------------------------------------ low level
    def _pad(self, rows: Sequence[Ids]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lens = [len(r) for r in rows]
        T = max(lens)
        ids = torch.tensor([list(r) + [self.pad_id] * (T - n) for r, n in zip(rows, lens)], dtype=torch.long)
        mask = torch.tensor([[1] * n + [0] * (T - n) for n in lens], dtype=torch.long)
        real = sum(lens)
        self.stats.forward_calls += 1
        self.stats.real_tokens += real
        self.stats.padded_slots += len(rows) * T - real
        return ids, mask, torch.arange(T).unsqueeze(0).expand(len(rows), T)

    def _call(self, ids, mask, pos, keep: torch.Tensor | int, cache=None, use_cache=False):
        kwargs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                      position_ids=pos.to(self.device), use_cache=use_cache)
        if cache is not None:
            kwargs["past_key_values"] = cache
        if isinstance(keep, torch.Tensor):
            kwargs["logits_to_keep"] = keep.to(self.device)
        else:
            kwargs["logits_to_keep"] = keep
        with torch.inference_mode():
            out = self.model(**kwargs)
        return out.logits, (out.past_key_values if use_cache else None)

    @staticmethod
    def _gather(logits: torch.Tensor, keep_index: dict[int, int], wants: list[list[_Want]]) -> None:
        """Float32 log-softmax of the kept rows; gather the wanted tokens into each _Want."""
        for i, row_wants in enumerate(wants):
            if not row_wants:
                continue
            idx = sorted({w.pos for w in row_wants})
            k = torch.tensor([keep_index[p] for p in idx], device=logits.device)
            lsm = torch.log_softmax(logits[i, k].float(), dim=-1)
            where = {p: j for j, p in enumerate(idx)}
            for w in row_wants:
                vals = lsm[where[w.pos], torch.tensor(w.tokens, device=lsm.device)].cpu().numpy()
                w.out.update(zip(w.tokens, vals.astype(np.float64)))

    def _forward_wants(self, rows: Sequence[Ids], wants: list[list[_Want]], use_cache: bool = False):
        ids, mask, pos = self._pad(rows)
        positions = sorted({w.pos for ws in wants for w in ws})
        keep = torch.tensor(positions, dtype=torch.long) if positions else 1
        logits, cache = self._call(ids, mask, pos, keep, use_cache=use_cache)
        self._gather(logits, {p: j for j, p in enumerate(positions)}, wants)
        return cache, mask

    def _continue(self, cache, ctx_mask: torch.Tensor, sel: list[int], conts: list[tuple[int, ...]],
                  wants: list[list[_Want]]) -> None:
        """Branch rows ``sel`` of a cached (right-padded) batch with continuation tokens ``conts``."""
        cache.batch_select_indices(torch.tensor(sel, device=self.device))
        cids, cmask, _ = self._pad([list(c) for c in conts])
        sel_t = torch.tensor(sel)
        cm = ctx_mask[sel_t]
        mask = torch.cat([cm, cmask], dim=1)
        pos = cm.sum(1, keepdim=True) + torch.arange(cids.shape[1]).unsqueeze(0)
        logits, _ = self._call(cids, mask, pos, 0, cache=cache, use_cache=True)
        self._gather(logits, {p: p for p in range(cids.shape[1])}, wants)

    def _check_len(self, n: int, what: str) -> None:
        if n > self.max_length:
            raise ContextLengthError(f"{what} is {n} tokens, longer than {self.lm.name}'s context of "
                                     f"{self.max_length} tokens (nothing is truncated; shorten the prompt "
                                     f"or set max_length)")

    def _progress(self, it, total: int, desc: str):
        if not self.progress:
            return it
        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc=desc, leave=False)

    # ------------------------------------------------------------------ choices
    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[np.ndarray]:
        """Summed log-prob of every choice of every request: list of (K,) float64 arrays."""
        for n, r in enumerate(requests):
            if not r.context:
                raise ContextLengthError(f"request {n}: empty context (needs at least a BOS or one token)")
            self._check_len(len(r.context) + max(len(c) for c in r.choices) - 1, f"request {n} (context + choice)")
        results: list[np.ndarray] = [np.zeros(len(r.choices)) for r in requests]
        batches = _batches([len(r.context) for r in requests], self.batch_tokens, self.max_batch, self.max_padding)
        for batch in self._progress(batches, len(batches), "score"):
            reqs = [requests[i] for i in batch]
            last = [_Want(len(r.context) - 1, sorted({c[0] for c in r.choices})) for r in reqs]
            need_cache = any(len(c) > 1 for r in reqs for c in r.choices)
            cache, mask = self._forward_wants([r.context for r in reqs], [[w] for w in last], use_cache=need_cache)
            sel, conts, cwants, plans = [], [], [], []
            for b, r in enumerate(reqs):
                rows, row_wants, assign = _branch_plan(r.choices)
                plans.append((len(conts), assign))
                sel += [b] * len(rows)
                conts += rows
                cwants += row_wants
            if conts:
                self._continue(cache, mask, sel, conts, cwants)
            for b, r in enumerate(reqs):
                base, assign = plans[b]
                results[batch[b]][:] = [
                    _branch_sum(c, last[b].out[c[0]], cwants[base + assign[k]] if k in assign else None)
                    for k, c in enumerate(r.choices)]
        return results

    # ------------------------------------------------------------------ curves
    def score_curves(self, requests: Sequence[CurveRequest]) -> list[np.ndarray]:
        """Choice log-probs at every read position: list of (P, K) float64 arrays."""
        for n, r in enumerate(requests):
            self._check_len(len(r.ids) + max(len(c) for c in r.choices) - 1, f"curve {n}")
            if r.positions and (min(r.positions) < 0 or max(r.positions) >= len(r.ids)):
                raise ValueError(f"curve {n}: read positions must lie in [0, {len(r.ids) - 1}]")
        results = [np.zeros((len(r.positions), len(r.choices))) for r in requests]
        fallback: list[tuple[int, int, list[int]]] = []  # (request, position index, choice indices)
        batches = _batches([len(r.ids) for r in requests], self.batch_tokens, self.max_batch, self.max_padding)
        for batch in self._progress(batches, len(batches), "curves"):
            reqs = [requests[i] for i in batch]
            wants: list[list[_Want]] = []
            reads: list[dict] = []  # per row: (pi, k) -> list of _Want/(token) pairs
            tail: list[tuple[int, int, list[int]]] = []  # (row, pi, uncovered choices) at the last position
            for b, r in enumerate(reqs):
                by_pos: dict[int, _Want] = {}
                rd: dict = {}
                for pi, p in enumerate(r.positions):
                    unc = []
                    for k, c in enumerate(r.choices):
                        nxt = r.ids[p + 1: p + len(c)]
                        if len(c) > 1 and list(nxt) != list(c[:-1]):
                            unc.append(k)
                            continue
                        parts = []
                        for t, tok in enumerate(c):
                            w = by_pos.setdefault(p + t, _Want(p + t, []))
                            if tok not in w.tokens:
                                w.tokens.append(tok)
                            parts.append((p + t, tok))
                        rd[(pi, k)] = parts
                    if unc and p == len(r.ids) - 1:
                        w = by_pos.setdefault(p, _Want(p, []))
                        w.tokens.extend(t for t in {r.choices[k][0] for k in unc} if t not in w.tokens)
                        tail.append((b, pi, unc))
                    elif unc:
                        fallback.append((batch[b], pi, unc))
                wants.append(list(by_pos.values()))
                reads.append(rd)
            cache, mask = self._forward_wants([r.ids for r in reqs], wants, use_cache=bool(tail))
            for b, rd in enumerate(reads):
                got = {w.pos: w.out for w in wants[b]}
                for (pi, k), parts in rd.items():
                    results[batch[b]][pi, k] = sum(got[p][t] for p, t in parts)
            if tail:
                # branch the uncovered choices from the cache of the whole sequence
                sel, conts, cwants, plans = [], [], [], []
                for b, pi, unc in tail:
                    rows, row_wants, assign = _branch_plan([reqs[b].choices[k] for k in unc])
                    plans.append((len(conts), assign))
                    sel += [b] * len(rows)
                    conts += rows
                    cwants += row_wants
                if conts:
                    self._continue(cache, mask, sel, conts, cwants)
                for (b, pi, unc), (base, assign) in zip(tail, plans):
                    r = reqs[b]
                    got = next(w.out for w in wants[b] if w.pos == r.positions[pi])
                    for u, k in enumerate(unc):
                        c = r.choices[k]
                        results[batch[b]][pi, k] = _branch_sum(
                            c, got[c[0]], cwants[base + assign[u]] if u in assign else None)
        if fallback:
            self.stats.fallback_contexts += len(fallback)
            reqs = [ChoiceRequest(requests[n].ids[: requests[n].positions[pi] + 1],
                                  [requests[n].choices[k] for k in unc]) for n, pi, unc in fallback]
            for (n, pi, unc), vals in zip(fallback, self.score_choices(reqs)):
                results[n][pi, unc] = vals
        return results

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Ids], max_new_tokens: int, seeds: Sequence[int],
                 temperature: float = 1.0, stop_strings: Sequence[str] = (), stop_at_eos: bool = True,
                 top_k: int | None = None, top_p: float | None = None) -> list[Ids]:
        """Sample continuations; row i draws from its own ``torch.Generator`` seeded with ``seeds[i]``.

        ``temperature == 0`` is greedy decoding (argmax, equal to HF ``generate(do_sample=False)``).
        Otherwise, on the model's device, per step: ``z = logits / temperature`` (float32), then
        the top-k cut (``top_k``: keep the k largest, the rest −inf), then the nucleus cut
        (``top_p``: keep the smallest set of most probable tokens whose mass reaches top_p, at
        least one), ``p = softmax(z)``, and **inverse-CDF sampling** with one uniform u per row and
        step from that row's generator: ``token = #{k : F_k ≤ u·F_V}`` (F the float64 cumulative
        sum in vocabulary order), so a row's sample does not depend on the other rows of its batch.
        Only the sampled ids leave the device. Returns the new token ids of each prompt, up to and
        including the first EOS (``stop_at_eos``) or the token that completes a stop string; stop
        strings are looked for in the decoded text of the last few tokens only.
        """
        if len(seeds) != len(prompts):
            raise ValueError("generate needs one seed per prompt")
        if top_k is not None and top_k < 0:
            raise ValueError("top_k must be >= 0 (0 or None: no cut)")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError("top_p must lie in (0, 1] (None or 1: no cut)")
        for n, p in enumerate(prompts):
            self._check_len(len(p) + max_new_tokens, f"prompt {n} + max_new_tokens")
        eos = self.tokenizer.eos_token_id
        check_eos = stop_at_eos and eos is not None
        stops = [s for s in stop_strings if s]
        # a stop string of c characters lies within the decoded text of its last c + 1 tokens
        window = max((len(s) for s in stops), default=0) + 1
        out: list[Ids] = [[] for _ in prompts]
        batches = _batches([len(p) for p in prompts], self.batch_tokens, self.max_batch, self.max_padding)
        for batch in self._progress(batches, len(batches), "generate"):
            with torch.inference_mode():
                self._generate_batch([prompts[i] for i in batch], [int(seeds[i]) for i in batch],
                                     [out[i] for i in batch], max_new_tokens, temperature, top_k, top_p,
                                     eos if check_eos else None, stops, window)
        return out

    def _generate_batch(self, rows: Sequence[Ids], seeds: list[int], out: list[Ids], max_new_tokens: int,
                        temperature: float, top_k, top_p, eos: int | None, stops: list[str], window: int) -> None:
        """Decode one right-padded batch into ``out`` (one list per row), in place.

        The decoding loop keeps everything on the model's device: the attention mask is allocated
        once for prompt + ``max_new_tokens`` and sliced per step, positions are ``len(prompt) + step``,
        new ids go into a preallocated (B, max_new_tokens) tensor and are fed back without leaving
        the device, and EOS is tracked by a device bool per row. Host syncs per step: none when
        neither EOS nor stop strings end rows; one (``finished.all()``, as HF's loop) for EOS; one
        ``tolist`` of the step's B ids with stop strings (they are matched on the decoded text of
        the last ``window`` tokens of a row only). The ids come to the host once, at the end.
        """
        B = len(rows)
        lens = [len(r) for r in rows]
        T = max(lens)
        ids, mask, pos = self._pad(rows)
        last = sorted(set(n - 1 for n in lens))
        logits, cache = self._call(ids, mask, pos, torch.tensor(last), use_cache=True)
        where = {p: j for j, p in enumerate(last)}
        dev = logits.device
        step_logits = logits[torch.arange(B, device=dev), torch.tensor([where[n - 1] for n in lens], device=dev)]
        gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        full_mask = torch.ones((B, T + max_new_tokens), dtype=torch.long, device=self.device)
        full_mask[:, :T] = mask.to(self.device)
        pos_next = torch.tensor(lens, dtype=torch.long, device=self.device).unsqueeze(1)
        new = torch.empty((B, max_new_tokens), dtype=torch.long, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        done = [False] * B          # host view, stop-string path only
        steps = 0
        for step in range(max_new_tokens):
            nxt = sample_next(step_logits, temperature, gens, top_k, top_p)
            new[:, step] = nxt
            steps = step + 1
            if stops:
                for i, t in enumerate(nxt.tolist()):
                    if done[i]:
                        continue
                    row = out[i]
                    row.append(t)
                    if t == eos or any(s in self.tokenizer.decode(row[-window:]) for s in stops):
                        done[i] = True
                if all(done):
                    break
            elif eos is not None:
                finished |= nxt == eos
                if bool(finished.all()):
                    break
            if step == max_new_tokens - 1:
                break
            self.stats.forward_calls += 1
            self.stats.real_tokens += B
            logits, cache = self._call(nxt.unsqueeze(1), full_mask[:, : T + step + 1], pos_next + step, 1,
                                       cache=cache, use_cache=True)
            step_logits = logits[:, -1]
        if stops:
            return
        for i, row in enumerate(new[:, :steps].tolist()):
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            out[i].extend(row)

    # ------------------------------------------------------------------ attention (family G)
    def attention_mass(self, ids: Ids, query_positions: Sequence[int], key_groups: dict[str, Sequence[int]],
                       layers: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Attention mass from each query position onto groups of key positions.

        mass[g][q] = mean over the chosen layers and all heads of Σ_{k∈group g} A[layer, head, q, k].
        Needs eager attention; only these reduced numbers leave this function.
        """
        return self.attention_stats(ids, query_positions, key_groups, layers)["mean"]

    def attention_stats(self, ids: Ids, query_positions: Sequence[int], key_groups: dict[str, Sequence[int]],
                        layers: Sequence[int] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Both reductions of one eager forward pass, per group g and query q:

        * ``mean``: mean over the chosen layers and all heads of Σ_{k∈g} A[l, h, q, k];
        * ``max``:  Σ_{k∈g} max_l max_h A[l, h, q, k] — per key, the coin-flip study's metric
          (``get_attention_weight_icl.py``: max over heads, then over layers), summed over the group.
        """
        self._check_len(len(ids), "attention prompt")
        model = getattr(self.model, "module", self.model)
        prev = getattr(model.config, "_attn_implementation", "sdpa")
        if prev != "eager":
            model.set_attn_implementation("eager")
        try:
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([ids], device=self.device), output_attentions=True,
                            logits_to_keep=1)
            atts = out.attentions
            chosen = list(layers) if layers is not None else list(range(len(atts)))
            if not chosen:
                raise ValueError("attention_mass: no layers chosen")
            q = torch.tensor(list(query_positions), dtype=torch.long)
            # the mean over heads and layers commutes with the sum over keys: reduce every layer
            # to its head-averaged query rows (Q, T) once, then sum each group's columns
            rows = torch.zeros((len(q), len(ids)), dtype=torch.float32)
            rows_max = torch.zeros((len(q), len(ids)), dtype=torch.float32)  # attention weights are ≥ 0
            for li in chosen:
                a = atts[li][0][:, q.to(atts[li].device)].float()  # (heads, Q, T)
                rows += a.mean(0).cpu()
                rows_max = torch.maximum(rows_max, a.amax(0).cpu())
            rows /= len(chosen)
            res: dict[str, dict[str, np.ndarray]] = {"mean": {}, "max": {}}
            for g, keys in key_groups.items():
                k = torch.tensor(list(keys), dtype=torch.long)
                for how, r in (("mean", rows), ("max", rows_max)):
                    res[how][g] = (r[:, k].sum(-1) if len(k) else torch.zeros(len(q))).numpy().astype(np.float64)
            return res
        finally:
            if prev != "eager":
                model.set_attn_implementation(prev)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Float32 ``logits / temperature`` with the top-k and nucleus (top-p) cuts as −inf (HF's order)."""
    z = logits.float() / temperature
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(srt, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs       # mass of the more probable tokens
        drop = before >= top_p
        drop[..., 0] = False                                # always keep the most probable token
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    return z


def sample_next(logits: torch.Tensor, temperature: float, gens: Sequence[torch.Generator],
                top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Next token per row of ``logits`` (B, V), on their device; greedy when ``temperature == 0``.

    Sampling is inverse CDF with one uniform per row from that row's generator:
    ``token = #{k : F_k ≤ u · F_V}``, F the float64 cumulative sum of the filtered probabilities.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    cdf = torch.cumsum(probs.double(), dim=-1)
    u = torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64) for g in gens]).to(cdf.device)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return idx.clamp_(max=logits.shape[-1] - 1)


def choice_distribution(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renormalised distribution over the choices and the off-choice mass.

    p_c = exp(lp_c) / Σ_c' exp(lp_c');  off = 1 − Σ_c exp(lp_c)  (on the last axis).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    m = lp.max(axis=-1, keepdims=True)
    e = np.exp(lp - m)
    probs = e / e.sum(axis=-1, keepdims=True)
    off = 1.0 - np.exp(lp).sum(axis=-1)
    return probs, np.clip(off, 0.0, 1.0)


@dataclass
class ChoiceResult:
    """Scores of one prompt's choices (the `bayesflip score` payload)."""

    choices: list[str]
    logprobs: np.ndarray   # summed token log-probs, (K,)
    probs: np.ndarray      # renormalised over the choices
    off_choice_mass: float

    def to_json(self, model: str) -> dict:
        return {"model": model, "choices": self.choices, "logprobs": [float(x) for x in self.logprobs],
                "probs": [float(x) for x in self.probs], "off_choice_mass": float(self.off_choice_mass)}


def score_prompts(scorer: Scorer, prompts: Sequence, choices: Sequence[str], terminator: str = "") -> list[ChoiceResult]:
    """Text-level ``loglikelihood``: every prompt (str or Prompt) with the same choice set."""
    from .prompts import encode_choices, encode_text, render

    results = []
    texts = [render(p, scorer.tokenizer) for p in prompts]
    reqs = []
    for t in texts:
        enc = encode_choices(scorer.tokenizer, choices, terminator=terminator, context_text=t)
        reqs.append(ChoiceRequest(encode_text(scorer.tokenizer, t), enc.ids))
    for lp in scorer.score_choices(reqs):
        probs, off = choice_distribution(lp)
        results.append(ChoiceResult(list(choices), lp, probs, float(off)))
    return results
