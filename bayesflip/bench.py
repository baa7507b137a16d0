"""``make bench``: the framework against a naive baseline, same model, same machine, same run.

Benchmarks (all on ``smollm2-135m-instruct`` unless ``--model``):

* ``icl_curve`` — predictive distribution after every prefix 0..100 of 100-flip coin
  sequences. Framework: one ``score_curves`` pass per sequence (batched). Baseline (the
  original study's method): a separate forward pass per prefix length *and per choice*.
  The baseline is timed on every 5th prefix of 2 of the sequences (evenly spaced lengths, so
  their mean cost is representative) and scaled to all prefixes of all sequences; the measured
  and the scaled times and the number of prefixes measured are all reported.
* ``multi_choice`` — needle-style prompts with the choices ``1``..``10`` (multi-token here,
  terminator ``.``) and die faces. Baseline: one forward per (prompt, choice), timed on 6 of
  the 24 prompts and scaled; its token count is exact for all prompts.
  ``tokens_ratio`` = model tokens processed by the baseline / by the framework.
* ``engine_overhead`` — framework end-to-end throughput (tokenization, batching, scoring
  and a Zarr write) divided by a raw batched ``model(input_ids)`` forward over the same
  padded batches: ``efficiency``.
* ``generate`` — engine ``generate`` vs transformers ``model.generate``, same prompts, one batch,
  greedy and sampled: tokens/s of both and the ratio, greedy agreement, and the engine's
  device→host syncs per decoding step (:mod:`bayesflip.bench_generate`).
* ``every_position`` — 8 rows × 1,000 tokens, every position read, 4 choices (Markov shape): the
  engine vs one bare forward + float32 log-softmax + one gather; efficiency, max |Δ|, and host
  syncs + host↔device copies per forward (:mod:`bayesflip.bench_reads`).
* ``generate_stops`` — 16 prompts, sampled and greedy, 2 stop strings, EOS on: engine vs HF
  ``generate(stop_strings=...)`` on the same new tokens (:func:`bayesflip.bench_generate.bench_generate_stops`).
* ``padding`` — fraction of padded slots in the framework's batches for a needle grid.
* ``sweep_submit`` — plan + submit a 1,000-task array to the local SLURM (if up) and the
  number of ``sbatch`` calls made (counted by a logging wrapper in front of the real sbatch);
  the array is cancelled right after.

Writes ``results/bench/bench.json``: ``{"<name>": {"speedup": ..., "max_abs_diff": ...}, "machine": {...},
"git_commit": "..."}``. Ratios, not absolute timings, are the point: no timed assertions in tests.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .engine import ChoiceRequest, Scorer, choice_distribution
from .experiments.seq import build_curve
from .paths import RESULTS_DIR
from .prompts import Prompt, encode_piece, encode_prompt
from .store import git_commit, library_versions


# ---------------------------------------------------------------- device helpers
def model_device(model) -> torch.device:
    """Where a model's inputs go (the input embedding's device; unwraps a DeepSpeed engine)."""
    hf = getattr(model, "module", model)
    return hf.get_input_embeddings().weight.device


def _now() -> float:
    """perf_counter once the GPU has finished its queued work (CUDA timings are meaningless otherwise)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


# ---------------------------------------------------------------- naive baseline (independent code)
def naive_choice_logprob(model, ids: list[int], choice: list[int]) -> tuple[float, int]:
    """One plain forward of prompt+choice; summed float32 log-probs of the choice tokens."""
    full = torch.tensor([ids + choice], device=model_device(model))
    with torch.inference_mode():
        lsm = model(full).logits[0].float().log_softmax(-1)
    n = len(ids)
    return float(sum(lsm[n - 1 + j, choice[j]] for j in range(len(choice)))), full.shape[1]


def _coin_sequences(n_seq: int, n_flips: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    thetas = np.linspace(0.1, 0.9, n_seq)
    return [(rng.random(n_flips) >= t).astype(int) for t in thetas]  # 0 = heads, 1 = tails


def bench_icl_curve(lm, n_seq: int = 10, n_flips: int = 100, baseline_seqs: int = 2, baseline_stride: int = 5) -> dict:
    tok = lm.tokenizer
    choices = [" heads", " tails"]
    head = Prompt("I tossed a coin and it landed on")
    seqs = _coin_sequences(n_seq, n_flips)
    sc = Scorer(lm)
    t = _now()
    reqs = [build_curve(tok, head, choices, s, ", then") for s in seqs]
    curves = sc.score_curves(reqs)
    fw = _now() - t
    fw_probs = [choice_distribution(c)[0] for c in curves]
    cids = [encode_piece(tok, c) for c in choices]
    t = _now()
    diffs = []
    measured = 0
    for r, probs in zip(reqs[:baseline_seqs], fw_probs[:baseline_seqs]):
        for i, p in list(enumerate(r.positions))[::baseline_stride]:
            measured += 1
            lps = np.array([naive_choice_logprob(lm.model, r.ids[: p + 1], c)[0] for c in cids])
            diffs.append(np.abs(choice_distribution(lps)[0] - probs[i]).max())
    base_measured = _now() - t
    base = base_measured / measured * n_seq * (n_flips + 1)  # evenly spaced prefixes: mean cost is representative
    return {"speedup": base / fw, "max_abs_diff": float(max(diffs)), "framework_s": fw, "baseline_s": base,
            "baseline_measured_s": base_measured, "baseline_sequences_measured": baseline_seqs,
            "baseline_prefixes_measured": measured,
            "sequences": n_seq, "prefixes_per_sequence": n_flips + 1, "forward_passes_framework": sc.stats.forward_calls,
            "forward_passes_baseline": n_seq * (n_flips + 1) * len(choices)}


def _needle_prompts(n: int, seed: int = 0) -> list[str]:
    """Needle-style prompts: filler sentences of varied length with a bias statement."""
    import pydoc_data.topics as topics

    words = " ".join(topics.topics[k] for k in sorted(topics.topics)[:40]).split()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(10, 200))
        start = int(rng.integers(0, len(words) - L))
        filler = " ".join(words[start: start + L])
        out.append(f"{filler} When I pick numbers they are always even. I picked a random number between 1 and 10 "
                   f"and it was")
    return out


def bench_multi_choice(lm, n_prompts: int = 24, baseline_prompts: int = 6) -> dict:
    """Framework: one batched score_choices per choice set. Baseline timed on ``baseline_prompts``
    prompts (scaled to all); baseline token counts are exact for all prompts."""
    tok = lm.tokenizer
    sets = {"number": ([f" {i}" for i in range(1, 11)], "."), "die": ([f" {i}" for i in range(1, 7)], "")}
    prompts = _needle_prompts(n_prompts)
    ctxs = [encode_prompt(tok, p) for p in prompts]
    sc = Scorer(lm)
    fw_t, base_t, diffs = 0.0, 0.0, []
    results = {}
    for name, (labels, term) in sets.items():
        cids = [encode_piece(tok, c + term) for c in labels]
        t = _now()
        res = sc.score_choices([ChoiceRequest(c, cids) for c in ctxs])
        fw_t += _now() - t
        results[name] = (cids, res)
    fw_tokens = sc.stats.real_tokens
    base_tokens = sum(len(ctx) + len(c) for cids, _ in results.values() for ctx in ctxs for c in cids)
    step = max(1, n_prompts // baseline_prompts)
    idx = list(range(0, n_prompts, step))[:baseline_prompts]
    for _name, (cids, res) in results.items():
        t = _now()
        for i in idx:
            base = np.array([naive_choice_logprob(lm.model, ctxs[i], c)[0] for c in cids])
            diffs.append(np.abs(choice_distribution(base)[0] - choice_distribution(res[i])[0]).max())
        base_t += _now() - t
    base_scaled = base_t / len(idx) * n_prompts
    return {"speedup": base_scaled / fw_t, "max_abs_diff": float(max(diffs)), "tokens_ratio": base_tokens / fw_tokens,
            "framework_s": fw_t, "baseline_s": base_scaled, "baseline_measured_s": base_t,
            "baseline_prompts_measured": len(idx), "prompts": n_prompts,
            "choices_per_prompt": {k: len(v[0]) for k, v in results.items()},
            "choice_tokens": {k: [len(c) for c in v[0]] for k, v in results.items()}}


def bench_engine_overhead(lm, n_seq: int = 32, n_flips: int = 60, tmpdir: Path | None = None) -> dict:
    """End-to-end framework throughput over raw batched forwards of the same token batches."""
    import tempfile

    import zarr

    tok = lm.tokenizer
    seqs = _coin_sequences(n_seq, n_flips, seed=1)
    head = Prompt("I tossed a coin and it landed on")
    sc = Scorer(lm)
    tmp = Path(tmpdir or tempfile.mkdtemp(prefix="bench-"))
    t = _now()
    reqs = [build_curve(tok, head, [" heads", " tails"], s, ", then") for s in seqs]
    curves = sc.score_curves(reqs)
    arr = zarr.open_array(tmp / "bench.zarr", mode="w", shape=(n_seq, n_flips + 1, 2), chunks=(8, n_flips + 1, 2),
                          dtype="float32")
    arr[:] = np.stack(curves).astype(np.float32)
    fw = _now() - t
    tokens = sum(len(r.ids) for r in reqs)
    # raw: the same length-sorted batches, plain model(input_ids, attention_mask)
    from .engine import _batches

    batches = _batches([len(r.ids) for r in reqs], sc.batch_tokens, sc.max_batch, sc.max_padding)
    t = _now()
    for b in batches:
        rows = [reqs[i].ids for i in b]
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), sc.pad_id)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.inference_mode():
            lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
    raw = _now() - t
    return {"efficiency": (tokens / fw) / (tokens / raw), "framework_tokens_per_s": tokens / fw,
            "raw_tokens_per_s": tokens / raw, "tokens": tokens, "sequences": n_seq,
            "note": "raw = plain batched model(input_ids) over the same padded batches (full logits)"}


def bench_padding(lm, n_prompts: int = 200) -> dict:
    tok = lm.tokenizer
    sc = Scorer(lm)
    prompts = _needle_prompts(n_prompts, seed=3)
    ctxs = [encode_prompt(tok, p) for p in prompts]
    cids = [encode_piece(tok, c) for c in [" heads", " tails"]]
    sc.score_choices([ChoiceRequest(c, cids) for c in ctxs])
    naive_pad = sum(max(map(len, ctxs)) - len(c) for c in ctxs)  # one unsorted full batch, for comparison
    return {"padding": sc.stats.padding_fraction, "padded_slots": sc.stats.padded_slots,
            "real_tokens": sc.stats.real_tokens, "batches": sc.stats.forward_calls,
            "unsorted_single_batch_padding": naive_pad / (naive_pad + sum(map(len, ctxs)))}


def bench_sweep_submit(n_tasks: int = 1000) -> dict:
    from .hpc.bench_submit import submit_array_benchmark  # provided by the HPC layer

    return submit_array_benchmark(n_tasks)


def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": "cpu", "versions": library_versions()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


BENCHES = ["icl_curve", "multi_choice", "engine_overhead", "every_position", "padding", "generate", "generate_stops",
           "shard_groups", "sweep_submit"]


def run_bench(only: list[str] | None = None, model: str = "smollm2-135m-instruct", out: Path | None = None,
              dtype: str | None = None, device: str | None = None) -> dict:
    from .models.loader import load_model

    lm = load_model(model, dtype=dtype, device=device)  # the GPU when there is one; inputs follow lm.device
    names = only or BENCHES
    res: dict = {}
    for name in names:
        t = _now()
        print(f"[bench] {name} ...", flush=True)
        if name == "icl_curve":
            res[name] = bench_icl_curve(lm)
        elif name == "multi_choice":
            res[name] = bench_multi_choice(lm)
        elif name == "engine_overhead":
            res[name] = bench_engine_overhead(lm)
        elif name == "padding":
            res[name] = bench_padding(lm)
        elif name == "generate":
            from .bench_generate import bench_generate

            res[name] = bench_generate(lm)
        elif name == "every_position":
            from .bench_reads import bench_every_position

            res[name] = bench_every_position(lm)
        elif name == "generate_stops":
            from .bench_generate import bench_generate_stops

            res[name] = bench_generate_stops(lm)
        elif name == "shard_groups":
            from .bench_groups import bench_shard_groups

            res[name] = bench_shard_groups(lm)
        elif name == "sweep_submit":
            try:
                res[name] = bench_sweep_submit()
            except (ImportError, RuntimeError, OSError) as e:
                res[name] = {"skipped": f"{type(e).__name__}: {e}"}
        else:
            raise ValueError(f"unknown benchmark {name!r} (allowed: {', '.join(BENCHES)})")
        res[name]["bench_wall_s"] = _now() - t
    res["machine"] = machine_info()
    res["machine"]["model_device"] = str(lm.device)
    res["model"] = model
    res["dtype"] = dtype or lm.spec.dtype
    res["git_commit"] = git_commit()
    path = Path(out or RESULTS_DIR / "bench" / "bench.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, default=float))
    print_table(res)
    print(f"[bench] wrote {path}")
    return res


GOALS = {("icl_curve", "speedup"): (">=", 100), ("multi_choice", "speedup"): (">=", 3),
         ("engine_overhead", "efficiency"): (">=", 0.9), ("padding", "padding"): ("<=", 0.1),
         ("icl_curve", "max_abs_diff"): ("<=", 1e-4), ("multi_choice", "max_abs_diff"): ("<=", 1e-4),
         # nested metrics are keyed "<group>.<metric>"; "*.<metric>" applies to every group
         ("generate", "greedy.ratio_engine_over_hf"): (">=", 0.95),
         ("generate", "sampled.ratio_engine_over_hf"): (">=", 1.0),
         ("generate", "*.sampler_host_syncs_per_step"): ("<=", 0),
         ("generate", "greedy.greedy_rows_identical_to_hf"): ("all", None),
         ("shard_groups", "forward_calls_ratio"): (">=", 2), ("shard_groups", "max_abs_diff"): ("<=", 5e-5),
         ("every_position", "syncs_and_copies_per_forward"): ("<=", 3), ("every_position", "efficiency"): (">=", 1.0),
         ("every_position", "max_abs_diff"): ("<=", 1e-4),
         ("generate_stops", "sampled.ratio_engine_over_hf"): (">=", 1.3),
         ("generate_stops", "sampled.tokens_identical_to_hf"): ("all", None),
         ("generate_stops", "greedy.greedy_rows_identical_to_hf"): ("all", None)}


def goal_of(name: str, key: str) -> tuple | None:
    """The goal of metric ``key`` (``metric`` or ``group.metric``) of benchmark ``name``, if any."""
    if (name, key) in GOALS:
        return GOALS[(name, key)]
    if "." in key:
        return GOALS.get((name, "*." + key.split(".", 1)[1]))
    return None


def goal_met(goal: tuple, v) -> bool:
    if goal[0] == "all":  # "a/b" counts: all b agree
        a, b = str(v).split("/")
        return a == b
    return v >= goal[1] if goal[0] == ">=" else v <= goal[1]


def print_table(res: dict) -> None:
    print(f"{'benchmark':18s} {'metric':38s} {'value':>12s}  goal")
    for name in BENCHES:
        if name not in res:
            continue
        items: list[tuple[str, Any]] = []
        for k, v in res[name].items():  # one level of nesting (generate: greedy / sampled)
            items += [(f"{k}.{k2}", v2) for k2, v2 in v.items()] if isinstance(v, dict) else [(k, v)]
        for k, v in items:
            goal = goal_of(name, k)
            g = ""
            if goal:
                g = f"{'all agree' if goal[0] == 'all' else f'{goal[0]} {goal[1]}'}  " \
                    f"{'met' if goal_met(goal, v) else 'MISSED'}"
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("wall_s"):
                print(f"{name:18s} {k:38s} {v:12.4g}  {g}")
            elif isinstance(v, str) and goal:
                print(f"{name:18s} {k:38s} {v:>12s}  {g}")
            elif k == "skipped":
                print(f"{name:18s} skipped: {v}")


def bench_cli(args) -> int:
    only = args.only.split(",") if args.only else None
    run_bench(only=only, out=Path(args.out) if args.out else None, model=getattr(args, "model", None) or
              "smollm2-135m-instruct", device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))
    return 0
