"""Tensor-parallel consistency check: run by every rank, compared with a single-process backend.

    torchrun --nproc_per_node 2 -m bayesflip.backends.tp_check --model tiny-random-llama-tp2 --out DIR

Each rank writes ``DIR/rank<r>.json`` with choice log-probs, a curve, seeded greedy and sampled
generations, attention masses, its ``is_writer`` flag and the message of a failure injected on
the last rank only (which :func:`~bayesflip.backends.distributed.agree` must raise on all ranks).
:func:`collect` is the same measurement for any backend (the test runs it on ``hf`` in-process).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

PROMPTS = ["I tossed a coin and it landed on", "I picked a random number between 1 and 10 and it was",
           "Here are my coin flips: heads, tails, heads, heads,"]
CHOICES = [" heads", " tails", " 7.", " 10."]


def collect(be) -> dict:
    from ..engine import ChoiceRequest, CurveRequest
    from ..prompts import encode_piece, encode_prompt

    tok = be.tokenizer
    ctxs = [encode_prompt(tok, p) for p in PROMPTS]
    cids = [encode_piece(tok, c) for c in CHOICES]
    choices = [lp.tolist() for lp in be.score_choices([ChoiceRequest(c, cids) for c in ctxs])]
    seq = ctxs[2] + encode_piece(tok, " tails,") + encode_piece(tok, " heads,")
    curve = be.score_curves([CurveRequest(seq, list(range(len(ctxs[2]) - 1, len(seq))), cids[:2])])[0].tolist()
    greedy = be.generate(ctxs[:2], 8, seeds=[0, 1], temperature=0)
    sampled = be.generate(ctxs[:2], 8, seeds=[11, 12], temperature=1.0)
    groups = {"first": list(range(0, 4)), "last": list(range(len(seq) - 4, len(seq))), "all": list(range(len(seq)))}
    att = {k: v.tolist() for k, v in be.attention_mass(seq, [len(seq) - 5, len(seq) - 1], groups).items()}
    return {"choices": choices, "curve": curve, "greedy": greedy, "sampled": sampled, "attention": att,
            "revision": be.revision}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny-random-llama-tp2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--fp32-head", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import load_backend
    from .distributed import RankFailure

    from ..models.registry import get_model_spec

    spec = get_model_spec(a.model)
    if a.dtype or a.fp32_head:
        spec = spec.model_copy(update={"dtype": a.dtype or spec.dtype, "fp32_head": a.fp32_head})
    be = load_backend(spec, device=a.device)
    res = collect(be)
    try:
        def boom():
            if be.rank == be.world_size - 1:
                raise RuntimeError(f"injected on rank {be.rank}")
        be.agree(boom, "check shard")
        res["agree_error"] = None
    except RankFailure as e:
        res["agree_error"] = str(e)
    res.update(rank=be.rank, world_size=be.world_size, is_writer=be.is_writer, device=str(be.device),
               model_class=type(be.model).__name__, read_head=type(be.scorer.read_head).__name__)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{be.rank}.json").write_text(json.dumps(res))
    import torch.distributed as dist

    if dist.is_initialized():  # leave together: a rank that exits first aborts its peers' gloo threads
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
