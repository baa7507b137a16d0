"""bf16 vs float32: how far P(heads) moves — bf16 logits, float32 reads (the default), ``fp32_head``.

    python -m bayesflip.backends.precision [--model smollm2-135m-instruct] [--device cpu]

Scores coin prompts with the model in float32; in bfloat16 with bf16 logits (``read_dtype:
model``); in bfloat16 with the output layer applied in float32 at the read positions
(``read_dtype: float32``, the default); and in bfloat16 with the final norm and output layer in
float32 (``fp32_head: true``), through the same engine, and reports the largest deviation from
float32 of P(" heads") (raw and renormalised over heads/tails) and of the choice log-probs.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

COIN_PROMPTS = [
    "I tossed a coin and it landed on",
    "I flipped a fair coin. It came up",
    "Here are my coin flips: heads, tails, heads, heads, tails, heads, heads, heads, tails, then",
    "A biased coin lands on heads 80% of the time. I tossed it and it landed on",
    "Here are my coin flips: tails, tails, tails, heads, tails, tails, then",
    "Coin toss result:",
]
CHOICES = [" heads", " tails"]


def _probs(be, prompts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from ..engine import ChoiceRequest
    from ..prompts import encode_piece, encode_prompt

    tok = be.tokenizer
    cids = [encode_piece(tok, c) for c in CHOICES]
    lps = np.stack(be.score_choices([ChoiceRequest(encode_prompt(tok, p), cids) for p in prompts]))
    raw = np.exp(lps[:, 0])
    renorm = np.exp(lps[:, 0]) / np.exp(lps).sum(1)
    return raw, renorm, lps


def bf16_deviation(model: str = "smollm2-135m-instruct", device: str | None = None,
                   prompts: list[str] | None = None) -> dict:
    from . import load_backend
    from ..models.registry import get_model_spec

    prompts = prompts or COIN_PROMPTS
    base = get_model_spec(model)
    runs = {"float32": base.model_copy(update={"dtype": "float32", "fp32_head": False}),
            "bfloat16": base.model_copy(update={"dtype": "bfloat16", "fp32_head": False, "read_dtype": "model"}),
            "bfloat16+fp32_reads": base.model_copy(update={"dtype": "bfloat16", "fp32_head": False,
                                                           "read_dtype": "float32"}),
            "bfloat16+fp32_head": base.model_copy(update={"dtype": "bfloat16", "fp32_head": True})}
    got = {k: _probs(load_backend(s, device=device), prompts) for k, s in runs.items()}
    ref_raw, ref_ren, ref_lp = got["float32"]
    out: dict = {"model": model, "prompts": prompts, "p_heads_float32": ref_raw.tolist()}
    for k in ("bfloat16", "bfloat16+fp32_reads", "bfloat16+fp32_head"):
        raw, ren, lp = got[k]
        out[k] = {"max_abs_dp_heads": float(np.abs(raw - ref_raw).max()),
                  "mean_abs_dp_heads": float(np.abs(raw - ref_raw).mean()),
                  "max_abs_dp_heads_renorm": float(np.abs(ren - ref_ren).max()),
                  "max_abs_dlogprob": float(np.abs(lp - ref_lp).max()),
                  "p_heads": raw.tolist()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    print(json.dumps(bf16_deviation(a.model, a.device), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
