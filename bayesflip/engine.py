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
ids. Sequences longer than the model's context raise :class:`ContextLengthError`; nothing is
ever truncated.

**Reads, one device-side pass per forward** (:meth:`Scorer._read_pass`): the output layer is
applied to the hidden states of exactly the (row, position) pairs that are read — gathered with
one index tensor, not the union of positions over the batch's rows — in **float32** by default
(:class:`ReadHead`; registry ``read_dtype: model`` keeps the model's dtype, faster on a GPU, with
logits rounded to bf16), whatever the model applies after its output layer (Gemma-2's logit
soft-capping) is still applied, then a float32 log-softmax on the device (row chunks of at most
:data:`READ_CHUNK_ELEMS` logits) and every wanted token id gathered with one index tensor. Per forward pass: one host→device copy (ids, mask, positions and all indices packed into
one tensor) and one device→host copy (the wanted log-probs). Under DeepSpeed tensor parallelism
the backend installs a vocabulary-parallel float32 read head (:mod:`bayesflip.backends.deepspeed`).

**Generation** (:meth:`Scorer.generate`): stop strings are matched at the token level: a token
can complete a stop string only if its text contains the stop string's last character (or an
undecodable byte, or nothing): :meth:`Scorer.stop_candidates`; the decoded-text check runs only
when such a token is sampled. Rows that finished (EOS, stop string) leave the batch (their KV
cache rows are dropped). On a GPU several prefill batches (each within ``batch_tokens``) are
decoded together, as many rows as the KV-cache budget holds (``kv_cache_gb``, :meth:`Scorer.decode_groups`;
on the CPU only with an explicit ``kv_cache_gb``: merging changes which rows share a forward, and so
the float rounding of their logits and, rarely, a sampled token).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from .errors import ContextLengthError

Ids = list[int]

READ_CHUNK_ELEMS = 1 << 26      # log-softmax over at most this many logits at once (256 MB in float32)
MAX_DECODE_ROWS = 256           # rows decoded together at most (the KV budget usually binds first)
_STOP_CANDIDATES: dict = {}     # (id(tokenizer), last characters) -> (tokenizer, (candidate ids, known ids))


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


@dataclass
class _Block:
    """Gather log-probs of the same ``tokens`` at every one of ``positions`` of a row (single-token
    choices: learning curves, Markov chains); ``out`` becomes the (P, K) array."""

    positions: np.ndarray
    tokens: list[int]
    out: np.ndarray | None = None


def _read_index(wants: list[list], T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """(flat read index ``row·T + pos`` per read, read of each (read, token) pair, token of each pair,
    [(item, first pair)]) for the ``_Want`` / ``_Block`` items of each row; pairs in read order."""
    flat, pr, pt, spans = [], [], [], []
    fl: list[int] = []
    prl: list[int] = []
    ptl: list[int] = []
    n = m = 0

    def flush():
        if fl:
            flat.append(np.asarray(fl, dtype=np.int64)), pr.append(np.asarray(prl, dtype=np.int64))
            pt.append(np.asarray(ptl, dtype=np.int64))
            fl.clear(), prl.clear(), ptl.clear()

    for i, items in enumerate(wants):
        for w in items:
            if not len(w.tokens):
                continue
            spans.append((w, m))
            if isinstance(w, _Block):
                flush()
                P, K = len(w.positions), len(w.tokens)
                flat.append(i * T + np.asarray(w.positions, dtype=np.int64))
                pr.append(n + np.repeat(np.arange(P, dtype=np.int64), K))
                pt.append(np.tile(np.asarray(w.tokens, dtype=np.int64), P))
                n, m = n + P, m + P * K
            else:
                fl.append(i * T + w.pos)
                prl.extend([n] * len(w.tokens))
                ptl.extend(w.tokens)
                n, m = n + 1, m + len(w.tokens)
    flush()
    def cat(xs: list) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)

    return cat(flat), cat(pr), cat(pt), spans


def row_chunks(rows: np.ndarray | Sequence[int], n: int, v: int, chunk_elems: int = READ_CHUNK_ELEMS) -> list[tuple[int, int, int, int]]:
    """(a, b, i, j): logit rows ``a:b`` hold the pairs ``i:j`` of the non-decreasing host array ``rows``;
    chunks of at most ``chunk_elems`` logits (``n`` rows of ``v``)."""
    step = max(1, chunk_elems // max(1, v))
    starts = np.arange(0, n, step)
    ends = np.minimum(starts + step, n)
    i = np.searchsorted(rows, starts, side="left")
    j = np.searchsorted(rows, ends, side="left")
    return list(zip(starts.tolist(), ends.tolist(), i.tolist(), j.tolist()))


class ReadHead:
    """The model's output layer applied to the read rows only.

    ``float32=True`` (default): ``z = h·Wᵀ (+ b)`` with ``h`` and ``W`` in float32 (a float32 copy of
    ``W`` is made once when the model is in bf16/fp16, none for a float32 model or ``fp32_head``);
    ``False``: the layer's own forward in the model's dtype. :meth:`logprobs` is the float32
    ``log_softmax(z)[r, t]`` of the (row, token) index pairs, on the device.
    A tensor-parallel backend subclasses it (vocabulary-parallel logits, reductions over ranks).
    """

    def __init__(self, module, float32: bool = True):
        self.module = module
        self.float32 = float32
        self._w: torch.Tensor | None = None
        self._b: torch.Tensor | None = None

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._w is None:
            w = self.module.weight.detach()
            self._w = w if w.dtype == torch.float32 else w.float()
            b = getattr(self.module, "bias", None)
            self._b = None if b is None else b.detach().float()
        return self._w, self._b

    def logits(self, h: torch.Tensor, base) -> torch.Tensor:
        """(N, H) hidden states → (N, V) logits; ``base`` is the layer's own forward (takes (1, N, H))."""
        if not self.float32 or not isinstance(getattr(self.module, "weight", None), torch.Tensor) \
                or self.module.weight.dim() != 2:
            return base(h.unsqueeze(0))[0]
        w, b = self._weights()
        if h.device != w.device:
            h = h.to(w.device)  # device_map models: the last hidden state may live on another GPU
        return torch.nn.functional.linear(h.float(), w, b)

    def logprobs(self, z: torch.Tensor, rows: torch.Tensor, toks: torch.Tensor, host_rows: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Float32 ``log_softmax(z)[rows, toks]`` for the (row, token) pairs; the log-softmax is taken over
        row chunks (:func:`row_chunks`; ``host_rows``: ``rows`` on the host, non-decreasing), so its
        temporaries stay bounded."""
        if rows.device != z.device:
            rows, toks = rows.to(z.device), toks.to(z.device)
        parts = []
        for a, b, i, j in row_chunks(host_rows, z.shape[0], z.shape[1]):
            if j > i:
                parts.append(torch.log_softmax(z[a:b].float(), -1)[rows[i:j] - a, toks[i:j]])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class ScoringModel(Protocol):
    """What experiment families call on ``RunContext.scorer``: a :class:`Scorer`, or a backend that wraps
    one (:class:`bayesflip.backends.base.Backend`). Structural, so unit tests may pass a bare Scorer."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def n_layers(self) -> int: ...

    @property
    def stats(self) -> EngineStats: ...

    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[np.ndarray]: ...

    def score_curves(self, requests: Sequence[CurveRequest]) -> list[np.ndarray]: ...

    def generate(self, prompts: Sequence[Ids], max_new_tokens: int, seeds: Sequence[int], *,
                 temperature: float = 1.0, stop_strings: Sequence[str] = (), stop_at_eos: bool = True,
                 top_k: int | None = None, top_p: float | None = None) -> list[Ids]: ...

    def attention_stats(self, ids: Ids, query_positions: Sequence[int], key_groups: dict[str, Sequence[int]],
                        layers: Sequence[int] | None = None) -> dict[str, dict[str, np.ndarray]]: ...


class Scorer:
    """Scoring engine bound to one loaded model (load once per job, score many cells).

    ``kv_cache_gb``: KV-cache budget of one decoding group (None: half the free GPU memory; on the CPU
    each prefill batch is decoded on its own, :meth:`decode_groups`). ``read_dtype``: ``float32`` (default) or ``model``
    (the output layer at read positions in the model's dtype); None: the registry entry's.
    """

    def __init__(self, lm, batch_tokens: int = 8192, max_batch: int = 64, progress: bool = False,
                 max_padding: float = 0.1, kv_cache_gb: float | None = None, read_dtype: str | None = None):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.device = lm.device
        self.max_length = lm.max_length
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        self.max_padding = max_padding
        self.progress = progress
        self.kv_cache_gb = kv_cache_gb
        self.stats = EngineStats()
        tok = self.tokenizer
        self.pad_id = next(x for x in (tok.pad_token_id, tok.eos_token_id, 0) if x is not None)
        self.read_dtype = read_dtype or getattr(getattr(lm, "spec", None), "read_dtype", None) or "float32"
        if self.read_dtype not in ("float32", "model"):
            raise ValueError(f"read_dtype must be 'float32' or 'model', not {self.read_dtype!r}")
        self.read_head = ReadHead(self.module.get_output_embeddings(), float32=self.read_dtype == "float32")

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
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lens)):
            ids[i, :n] = torch.as_tensor(r, dtype=torch.long)
            mask[i, :n] = 1
        real = sum(lens)
        self.stats.forward_calls += 1
        self.stats.real_tokens += real
        self.stats.padded_slots += len(rows) * T - real
        return ids, mask, torch.arange(T).unsqueeze(0).expand(len(rows), T)

    def _to_device(self, *parts: torch.Tensor) -> list[torch.Tensor]:
        """One host→device copy of several int64 host tensors; device views of the same shapes."""
        flat = torch.cat([p.reshape(-1) for p in parts]).to(self.device)
        out, i = [], 0
        for p in parts:
            out.append(flat[i: i + p.numel()].view(p.shape))
            i += p.numel()
        return out

    def _call(self, ids, mask, pos, keep: torch.Tensor | int, cache=None, use_cache=False):
        """A plain forward (generation): the model's own output layer, logits at ``keep``."""
        parts = [ids, mask, pos] + ([keep] if isinstance(keep, torch.Tensor) else [])
        dev = self._to_device(*parts)
        kwargs = dict(input_ids=dev[0], attention_mask=dev[1], position_ids=dev[2], use_cache=use_cache,
                      logits_to_keep=dev[3] if isinstance(keep, torch.Tensor) else keep)
        if cache is not None:
            kwargs["past_key_values"] = cache
        with torch.inference_mode():
            out = self.model(**kwargs)
        return out.logits, (out.past_key_values if use_cache else None)

    @contextmanager
    def _reading(self, flat_rows: torch.Tensor) -> Iterator[None]:
        """During one forward, the output layer sees only the hidden states at ``flat_rows``
        (indices into the (B·T, H) hidden states) and applies :attr:`read_head` to them: its
        instance ``forward`` is replaced for the call (hooks and what the model applies after
        the layer, e.g. logit soft-capping, still run)."""
        head = self.read_head.module
        prev = head.__dict__.get("forward")          # an instance-level forward (accelerate's hooks) or None
        base = prev if prev is not None else type(head).forward.__get__(head)
        rh = self.read_head

        def forward(x, *a, **k):
            rows = flat_rows if flat_rows.device == x.device else flat_rows.to(x.device)
            return rh.logits(x.reshape(-1, x.shape[-1]).index_select(0, rows), base).unsqueeze(0)

        head.forward = forward
        try:
            yield
        finally:
            if prev is None:
                del head.forward
            else:
                head.forward = prev

    def _read_pass(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, wants: list[list[_Want]],
                   cache=None, use_cache: bool = False, sel: list[int] | None = None):
        """One forward pass that fills every ``_Want`` of ``wants`` (one list per row of ``ids``).

        Host side: the flat index ``row·T + pos`` of every read, and one (read, token) pair per wanted
        token. One host→device copy (ids, mask, positions, indices, ``sel`` packed), the forward with the
        output layer on the read rows only (:meth:`_reading`), log-probs of all pairs on the device,
        one device→host copy. ``sel``: rows of ``cache`` to keep first (branching). Returns the cache."""
        B, T = ids.shape
        flat, pr, pt, spans = _read_index(wants, T)
        host = [ids, mask, pos, torch.from_numpy(flat), torch.from_numpy(pr), torch.from_numpy(pt)]
        if sel is not None:
            host.append(torch.tensor(sel, dtype=torch.long))
        dev = self._to_device(*host)
        if sel is not None:
            cache.batch_select_indices(dev[6])
        kwargs = dict(input_ids=dev[0], attention_mask=dev[1], position_ids=dev[2], use_cache=use_cache)
        if cache is not None:
            kwargs["past_key_values"] = cache
        with torch.inference_mode():
            if not len(flat):
                out = self.model(**kwargs, logits_to_keep=1)
                return out.past_key_values if use_cache else None
            with self._reading(dev[3]):
                out = self.model(**kwargs, logits_to_keep=0)
            vals = self.read_head.logprobs(out.logits[0], dev[4], dev[5], pr).cpu().numpy().astype(np.float64)
        listed = None
        for w, a in spans:
            if isinstance(w, _Block):
                w.out = vals[a: a + len(w.positions) * len(w.tokens)].reshape(len(w.positions), len(w.tokens))
            else:
                listed = vals.tolist() if listed is None else listed
                w.out.update(zip(w.tokens, listed[a: a + len(w.tokens)]))
        return out.past_key_values if use_cache else None

    def _forward_wants(self, rows: Sequence[Ids], wants: list[list[_Want]], use_cache: bool = False):
        ids, mask, pos = self._pad(rows)
        cache = self._read_pass(ids, mask, pos, wants, use_cache=use_cache)
        return cache, mask

    def _continue(self, cache, ctx_mask: torch.Tensor, sel: list[int], conts: list[tuple[int, ...]],
                  wants: list[list[_Want]]) -> None:
        """Branch rows ``sel`` of a cached (right-padded) batch with continuation tokens ``conts``."""
        cids, cmask, _ = self._pad([list(c) for c in conts])
        cm = ctx_mask[torch.tensor(sel)]
        mask = torch.cat([cm, cmask], dim=1)
        pos = cm.sum(1, keepdim=True) + torch.arange(cids.shape[1]).unsqueeze(0)
        self._read_pass(cids, mask, pos, wants, cache=cache, use_cache=True, sel=sel)

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
            conts: list[tuple[int, ...]]
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
            wants: list[list] = []
            reads: list = []  # per row: (pi, k) -> list of (position, token) parts, or (_Block, choice columns)
            tail: list[tuple[int, int, list[int]]] = []  # (row, pi, uncovered choices) at the last position
            for b, r in enumerate(reqs):
                if all(len(c) == 1 for c in r.choices):   # single-token choices: one block of reads, vectorised
                    uniq = list(dict.fromkeys(c[0] for c in r.choices))
                    block = _Block(np.asarray(r.positions, dtype=np.int64), uniq)
                    wants.append([block])
                    reads.append((block, [uniq.index(c[0]) for c in r.choices]))
                    continue
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
                if isinstance(rd, tuple):
                    block, cols = rd
                    results[batch[b]][:] = block.out[:, cols]
                    continue
                got = {w.pos: w.out for w in wants[b]}
                for (pi, k), parts in rd.items():
                    results[batch[b]][pi, k] = sum(got[p][t] for p, t in parts)
            if tail:
                # branch the uncovered choices from the cache of the whole sequence
                conts: list[tuple[int, ...]]
                sel, conts, cwants, plans = [], [], [], []
                for b, _pi, unc in tail:
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
        sum in vocabulary order), so a row's sample does not depend on the other rows of its batch
        (nor on when they stop). Only the sampled ids leave the device. Returns the new token ids of
        each prompt, up to and including the first EOS (``stop_at_eos``) or the token that completes a
        stop string: a stop string ``s`` is found when it occurs in the decoded text of the row's last
        ``max len(s) + 1`` new tokens, checked only after a token of :meth:`stop_candidates`.
        Prefill batches are the scoring batches (``batch_tokens``, ``max_batch``, ``max_padding``);
        :meth:`decode_groups` decodes several of them together within the KV-cache budget.
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
        lens = [len(p) for p in prompts]
        batches = _batches(lens, self.batch_tokens, self.max_batch, self.max_padding)
        groups = self.decode_groups(batches, lens, max_new_tokens)
        stop = _StopCheck(self, stops, window, eos if check_eos else None)
        for group in self._progress(groups, len(groups), "generate"):
            with torch.inference_mode():
                self._generate_group([[prompts[i] for i in b] for b in group], [int(seeds[i]) for b in group for i in b],
                                     [out[i] for b in group for i in b], max_new_tokens, temperature, top_k, top_p,
                                     stop)
        return out

    # -------------------------------------------------- decode batches
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes of one token of one row: ``layers · 2 · kv_heads · head_dim · bytes per element``
        (from the config; all heads, i.e. an upper bound for a tensor-parallel rank)."""
        c = self.config
        heads = int(getattr(c, "num_attention_heads", None) or c.n_head)
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        hidden = int(getattr(c, "hidden_size", None) or c.n_embd)
        head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
        elem = next(self.module.parameters()).element_size()
        return self.n_layers * 2 * kv * head_dim * elem

    def kv_budget_bytes(self) -> float | None:
        """The KV-cache budget of one decoding group: ``kv_cache_gb``, else half the free memory of the
        GPU; None on the CPU without ``kv_cache_gb`` (each prefill batch decoded on its own, as before)."""
        if self.kv_cache_gb is not None:
            return float(self.kv_cache_gb) * 2**30
        dev = torch.device(self.device)
        if dev.type == "cuda" and torch.cuda.is_available():
            return 0.5 * torch.cuda.mem_get_info(dev)[0]
        return None

    def decode_groups(self, batches: list[list[int]], lens: Sequence[int], max_new_tokens: int) -> list[list[list[int]]]:
        """Consecutive prefill batches decoded together: a group grows while its rows' KV cache,
        ``rows · (longest prompt + max_new_tokens) · kv_bytes_per_token``, fits :meth:`kv_budget_bytes`
        and it has at most :data:`MAX_DECODE_ROWS` rows (batches come longest first). Without a budget
        (the CPU, no ``kv_cache_gb``) every prefill batch is its own group.

        Merging batches changes which rows share a forward and how wide their (masked) KV cache is:
        logits move by float rounding, and the inverse-CDF draw of a row can then pick a neighbouring
        low-probability token (one row in one of the saved SmolLM2 cases did): the same distribution,
        not the same tokens as decoding each batch on its own. Finished rows leaving a batch do not
        change a row's numbers (tests/test_generate_cases.py)."""
        budget = self.kv_budget_bytes()
        if budget is None:
            return [[b] for b in batches]
        per_tok = self.kv_bytes_per_token()
        groups: list[list[list[int]]] = []
        cur: list[list[int]] = []
        rows = width = 0
        for b in batches:
            w = max(width, max(lens[i] for i in b))
            r = rows + len(b)
            if cur and (r * (w + max_new_tokens) * per_tok > budget or r > MAX_DECODE_ROWS):
                groups.append(cur)
                cur, r, w = [], len(b), max(lens[i] for i in b)
            cur.append(b)
            rows, width = r, w
        if cur:
            groups.append(cur)
        return groups

    def stop_candidates(self, stops: Sequence[str]) -> tuple[frozenset[int], int] | None:
        """(token ids that can complete one of ``stops``, number of ids the tokenizer knows), or None
        (check after every token).

        The text check runs every step in the old loop; it first succeeds at the step whose token
        added the stop string's **last character** (dropping a token at the start of the decoded
        window only shortens the text at its start). So a token is a candidate when its text — decoded
        alone, and after an anchor token (sentencepiece drops a leading space alone) — contains the last
        character of some stop string, contains U+FFFD (a partial UTF-8 sequence, completed by the
        bytes of the next token) or is empty; ids the tokenizer does not know are candidates too.
        Stop strings containing U+FFFD disable the filter. Cached per tokenizer and set of last characters."""
        lasts = frozenset(s[-1] for s in stops if s)
        if not lasts or any("\ufffd" in s for s in stops):
            return None
        tok = self.tokenizer
        key = (id(tok), lasts)
        if key not in _STOP_CANDIDATES:
            n = len(tok)
            anchor = (tok.encode("a", add_special_tokens=False) or [0])[:1]
            base = tok.decode(anchor)
            cand = set()
            for i in range(n):
                a, c = tok.decode([i]), tok.decode(anchor + [i])
                c = c[len(base):] if c.startswith(base) else c
                if not a or not c or "\ufffd" in a or "\ufffd" in c or any(x in a or x in c for x in lasts):
                    cand.add(i)
            _STOP_CANDIDATES[key] = (tok, (frozenset(cand), n))  # the tokenizer is held: its id stays unique
        return _STOP_CANDIDATES[key][1]

    # -------------------------------------------------- the decoding loop
    def _prefill(self, rows: Sequence[Ids]) -> tuple[Any, torch.Tensor, list[int], torch.Tensor]:
        """Prefill one right-padded batch: (cache, host mask, prompt lengths, logits of each row's last token)."""
        B = len(rows)
        lens = [len(r) for r in rows]
        ids, mask, pos = self._pad(rows)
        last = sorted(set(n - 1 for n in lens))
        where = {p: j for j, p in enumerate(last)}
        col = torch.tensor([where[n - 1] for n in lens], dtype=torch.long)
        parts = self._to_device(ids, mask, pos, torch.tensor(last, dtype=torch.long), col)
        with torch.inference_mode():
            out = self.model(input_ids=parts[0], attention_mask=parts[1], position_ids=parts[2], use_cache=True,
                             logits_to_keep=parts[3])
        logits = out.logits
        return out.past_key_values, mask, lens, logits[torch.arange(B, device=logits.device), parts[4]]

    @staticmethod
    def _mergeable(cache) -> bool:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        return type(cache) is DynamicCache and all(type(ly) is DynamicLayer and (k := getattr(ly, "keys", None)) is not None
                                                   and k.dim() == 4 for ly in cache.layers)

    @staticmethod
    def _merge(parts: list) -> tuple[Any, torch.Tensor, list[int], torch.Tensor]:
        """Several prefilled batches as one: KV caches padded with zeros (masked) to the longest prompt
        and concatenated over rows; returns (cache, host mask, lengths, last logits)."""
        T = max(p[1].shape[1] for p in parts)
        cache = parts[0][0]
        for li, layer in enumerate(cache.layers):
            ks, vs = [], []
            for c, _m, _, _ in parts:
                k, v = c.layers[li].keys, c.layers[li].values
                pad = T - k.shape[-2]
                ks.append(torch.nn.functional.pad(k, (0, 0, 0, pad)) if pad else k)
                vs.append(torch.nn.functional.pad(v, (0, 0, 0, pad)) if pad else v)
            layer.keys, layer.values = torch.cat(ks), torch.cat(vs)
        mask = torch.cat([torch.nn.functional.pad(m, (0, T - m.shape[1])) for _, m, _, _ in parts])
        lens = [n for p in parts for n in p[2]]
        return cache, mask, lens, torch.cat([p[3] for p in parts])

    def _generate_group(self, batches: list[list[Ids]], seeds: list[int], out: list[Ids], max_new_tokens: int,
                        temperature: float, top_k, top_p, stop: "_StopCheck") -> None:
        """Prefill the batches of one decoding group, merge them (when their caches allow it) and decode."""
        parts = [self._prefill(rows) for rows in batches]
        if len(parts) > 1 and not all(self._mergeable(p[0]) for p in parts):
            i = 0
            for p in parts:  # sliding-window / hybrid caches: decode each prefill batch on its own
                n = len(p[2])
                self._decode(*p, seeds[i: i + n], out[i: i + n], max_new_tokens, temperature, top_k, top_p, stop)
                i += n
            return
        self._decode(*(parts[0] if len(parts) == 1 else self._merge(parts)), seeds, out, max_new_tokens,
                     temperature, top_k, top_p, stop)

    def _decode(self, cache, mask: torch.Tensor, lens: list[int], step_logits: torch.Tensor, seeds: list[int],
                out: list[Ids], max_new_tokens: int, temperature: float, top_k, top_p, stop: "_StopCheck") -> None:
        """Decode one group into ``out`` (one list per row), in place.

        Everything stays on the model's device: the attention mask is allocated once for prompt +
        ``max_new_tokens`` (one host→device copy with the positions) and sliced per step, positions
        are ``len(prompt) + step``. Without EOS or stop strings the new ids go into a preallocated
        (B, max_new_tokens) tensor and reach the host once, at the end: no host sync per step. With
        them, one ``tolist`` of the step's ids per step (as HF's loop syncs once per step); a row ends
        at EOS or when a stop-string candidate token makes the text check succeed, and finished rows
        leave the batch (their cache rows, mask rows and generators are dropped).
        """
        B = len(lens)
        T = mask.shape[1]
        full = torch.ones((B, T + max_new_tokens), dtype=torch.long)
        full[:, :T] = mask
        full_mask, pos_next = self._to_device(full, torch.tensor(lens, dtype=torch.long).unsqueeze(1))
        dev = step_logits.device
        gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        track = stop.active
        new = None if track else torch.empty((B, max_new_tokens), dtype=torch.long, device=dev)
        active = list(range(B))
        steps = 0
        for step in range(max_new_tokens):
            nxt = sample_next(step_logits, temperature, gens, top_k, top_p)
            steps = step + 1
            if track:
                keep = [j for j, t in enumerate(nxt.tolist()) if not stop.ends(out[active[j]], t)]
                if not keep:
                    break
            else:
                assert new is not None   # allocated whenever no row is tracked
                new[:, step] = nxt
            if step == max_new_tokens - 1:
                break
            if track and len(keep) < len(active):
                idx = self._to_device(torch.tensor(keep, dtype=torch.long))[0]
                cache.batch_select_indices(idx)
                full_mask, pos_next, nxt = full_mask[idx], pos_next[idx], nxt[idx]
                gens = [gens[j] for j in keep]
                active = [active[j] for j in keep]
            self.stats.forward_calls += 1
            self.stats.real_tokens += len(active)
            with torch.inference_mode():
                o = self.model(input_ids=nxt.unsqueeze(1), attention_mask=full_mask[:, : T + step + 1],
                               position_ids=pos_next + step, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, step_logits = o.past_key_values, o.logits[:, -1]
        if new is not None:
            for i, row in enumerate(new[:, :steps].tolist()):
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


class _StopCheck:
    """Whether a row ends with its newest token: EOS, or a stop string in the decoded text of its last
    ``window`` tokens — decoded only when the token is a stop candidate (:meth:`Scorer.stop_candidates`)."""

    def __init__(self, scorer: Scorer, stops: list[str], window: int, eos: int | None):
        self.stops, self.window, self.eos = stops, window, eos
        self.decode = scorer.tokenizer.decode
        self.cand = scorer.stop_candidates(stops) if stops else None
        self.active = bool(stops) or eos is not None
        self.decodes = 0            # text checks made (tests, benchmarks)

    def ends(self, row: Ids, t: int) -> bool:
        """Append ``t`` to ``row``; True if the row is finished."""
        row.append(t)
        if t == self.eos:
            return True
        if not self.stops or (self.cand is not None and t < self.cand[1] and t not in self.cand[0]):
            return False
        self.decodes += 1
        text = self.decode(row[-self.window:])
        return any(s in text for s in self.stops)


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


def score_prompts(scorer: ScoringModel, prompts: Sequence, choices: Sequence[str], terminator: str = "") -> list[ChoiceResult]:
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
