"""Sampled continuations as text: seeded generation through the engine, decoded and cut at stops.

Used by the generating families (E: Poisson processes, H: chain of thought).

* The continuation's text is ``decode(prompt + new)[len(decode(prompt)):]`` (so tokenizers that
  drop a leading space when decoding a piece alone still give the exact text); if the joined
  decode does not start with the prompt's decode, ``decode(new)`` is used.
* The text is cut **before** the first stop string; stops are the caller's (e.g. a blank line
  ``"\\n\\n"``), the tokenizer's EOS token and, for chat prompts, the end-of-turn special tokens
  of the chat template (found by rendering a dummy assistant turn). ``stopped`` says whether
  a stop was hit (False = the length cap ended the sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..prompts import Prompt, encode_prompt


@dataclass(frozen=True)
class Sample:
    text: str          # the continuation, cut before the first stop
    n_tokens: int      # sampled tokens (including the one that completed a stop)
    stopped: bool      # a stop string / EOS / end of turn ended it (else: max_new_tokens)


def end_of_turn_strings(tokenizer) -> list[str]:
    """Special tokens that close an assistant turn in the chat template (e.g. ``<|im_end|>``)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    mark = "QZXJ-END-OF-ANSWER"
    txt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                        tokenize=False)
    tail = txt[txt.index(mark) + len(mark):] if mark in txt else ""
    return [s for s in tokenizer.all_special_tokens if s and s in tail]


def stop_strings(tokenizer, prompt: Prompt, extra: Sequence[str] = ()) -> list[str]:
    stops = [s for s in extra if s]
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    if prompt.is_chat:
        stops += end_of_turn_strings(tokenizer)
    return list(dict.fromkeys(stops))


def continuation_text(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    head = tokenizer.decode(list(prompt_ids))
    full = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return full[len(head):] if full.startswith(head) else tokenizer.decode(list(new_ids))


def cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` before the earliest stop string, and whether one occurred."""
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def sample_texts(scorer, prompts: Sequence[Prompt], seeds: Sequence[int], max_new_tokens: int,
                 temperature: float, extra_stops: Sequence[str] = (), top_k: int | None = None,
                 top_p: float | None = None) -> list[Sample]:
    """One seeded sample per prompt (same seed and prompt → identical sample); ``temperature`` 0 = greedy."""
    tok = scorer.tokenizer
    ids = [encode_prompt(tok, p) for p in prompts]
    stops = [stop_strings(tok, p, extra_stops) for p in prompts]
    gen_stops = sorted({s for ss in stops for s in ss})
    news = scorer.generate(ids, max_new_tokens, seeds=list(seeds), temperature=temperature,
                           stop_strings=gen_stops, stop_at_eos=True, top_k=top_k, top_p=top_p)
    out = []
    for pid, new, st in zip(ids, news, stops):
        text, hit = cut_at_stops(continuation_text(tok, pid, new), st)
        hit = hit or (len(new) > 0 and new[-1] == tok.eos_token_id)
        out.append(Sample(text=text, n_tokens=len(new), stopped=hit))
    return out


def sample_with(scorer, prompts: Sequence[Prompt], seeds: Sequence[int], settings, extra_stops: Sequence[str] = ()
                ) -> list[Sample]:
    """:func:`sample_texts` under resolved :class:`~bayesflip.generation.GenerationSettings`."""
    return sample_texts(scorer, prompts, seeds, settings.max_new_tokens, extra_stops=extra_stops,
                        **settings.engine_kwargs())
