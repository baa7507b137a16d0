"""``bayesflip gpu-check``: one prepared script for a fresh GPU machine (a few minutes, nothing downloaded).

    python -m bayesflip.gpu_check [--device cuda] [--tiny] [--out results/gpu_check/gpu_check.json]
                                  [--template NAME[,NAME...] | all] [--peak-tflops X]

Without a usable CUDA device it stops at once (exit 2, one line ``bayesflip: error: ...``) unless
``--device cpu`` is given: it never runs the 8B shape on a CPU by accident.

Writes one JSON file with

(a) ``contract`` — the engine on this device against plain forward passes, for the tiny random
    GPT-2 of the registry and a randomly initialised small Llama (built from a config in this
    file), in float32 and bfloat16: choice log-probs (multi-token choices included), a learning
    curve, greedy generation vs ``model.generate``, attention mass. float32 must agree to 1e-4;
    bfloat16 deviations are reported against a looser bound (different kernels / batch shapes
    round differently in bf16).
(b) ``throughput`` — the shapes jobs run, on a randomly initialised Llama-3.1-8B-shaped model
    (``--tiny``: the small Llama) in bfloat16 and in float32, and a SmolLM2-135M-shaped model in
    bfloat16 (``small``: small models are bound by kernel launches, not FLOPs), per kind of work:
    ``scoring`` — 8,192-token batches (the engine's default), one read per row (needle-like
    contexts, 1–3 token choices) vs a raw ``model(..., logits_to_keep=1)``; ``curve`` — every
    position read (the Markov families: rows of 1,000 tokens, 4 choices) vs one bare forward +
    float32 log-softmax + one gather, with host syncs + copies per forward; ``generation`` — sampled,
    two stop strings, EOS on (the generating families) vs HF ``generate(stop_strings=...)`` on the
    same new tokens (plus greedy / sampled without stops for the 8B bf16 shape). Model-FLOP
    utilisation against the device's peak for the dtype (looked up from the device name:
    :data:`PEAK_TFLOPS`; ``--peak-tflops`` overrides the bf16 figure) and peak memory.
(c) ``calibration`` — the planner's figures (:mod:`bayesflip.hpc.cost`): per kind (``score_tokens_per_s``,
    ``curve_tokens_per_s``, ``gen_tokens_per_s``) for bfloat16 and ``float32``, and the ``small`` model's,
    written to ``$BAYESFLIP_CACHE/throughput/<template>.json`` for every template of ``--template``
    (default on CUDA: every GPU template of ``job_templates/``): measured for one-GPU templates; for
    a template of N GPUs (tensor parallel) derived from this one-GPU measurement × N × an assumed
    TP efficiency (:data:`TP_EFFICIENCY`, marked ``derived`` in the file). ``bayesflip plan --dry-run``
    and ``submit`` then use them instead of the templates' on-paper figures.

``--device cpu --tiny`` runs the same code on the CPU in about a minute (tests use it).
The tokenizer is the embedded SmolLM2's (installed by ``make install``); weights are random.
"""

from __future__ import annotations

# torch is imported inside the functions that run checks, so that building the CLI parser
# (``add_arguments``) does not import it: every ``bayesflip`` command pays for that import.

import argparse
import json
import os
import platform
import time
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:   # annotations only: torch stays out of the CLI parser's imports (see above)
    import torch

SMALL_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False)
# meta-llama/Llama-3.1-8B config.json (shapes only; rope scaling omitted: it does not change cost)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, vocab_size=128256,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
# HuggingFaceTB/SmolLM2-135M config.json (shapes only): a small, launch-bound model
SMOL_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, vocab_size=49152,
                 tie_word_embeddings=True)
# dense peak TFLOP/s per device (vendor data sheets, without sparsity): (bf16/fp16 tensor cores, fp32 without TF32).
# Matched against torch.cuda.get_device_name in this order (first match wins).
PEAK_TFLOPS: list[tuple[tuple[str, ...], str, float, float]] = [
    (("H100", "PCIe"), "H100 PCIe", 756.0, 51.0),
    (("H100", "NVL"), "H100 NVL", 835.0, 60.0),
    (("GH200",), "GH200", 989.0, 67.0),
    (("H200",), "H200", 989.0, 67.0),
    (("H100",), "H100 SXM", 989.0, 67.0),
    (("B200",), "B200", 2250.0, 80.0),
    (("A100",), "A100", 312.0, 19.5),
    (("L40S",), "L40S", 362.0, 91.6),
    (("L40",), "L40", 181.0, 90.5),
    (("A6000",), "RTX A6000", 155.0, 38.7),
    (("A40",), "A40", 150.0, 37.4),
    (("A10",), "A10", 125.0, 31.2),
    (("L4",), "L4", 121.0, 30.3),
    (("V100",), "V100", 125.0, 15.7),
]
TP_EFFICIENCY = {"score_tokens_per_s": 0.75, "curve_tokens_per_s": 0.75, "gen_tokens_per_s": 0.5}  # assumed
TOL = {"float32": 1e-4, "bfloat16": 0.1}


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _now() -> float:
    _sync()
    return time.perf_counter()


def _tokenizer():
    from .models.loader import load_tokenizer
    from .models.registry import get_model_spec

    return load_tokenizer(get_model_spec("smollm2-135m-instruct"))


def random_llama(shape: dict, tokenizer, dtype: str, device: torch.device, seed: int = 0):
    """A randomly initialised Llama of ``shape`` in ``dtype`` (``float32`` | ``bfloat16``), built directly
    on ``device`` (no CPU copy)."""
    import torch

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{"vocab_size": len(tokenizer), **shape}, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def _loaded(name: str, model, tokenizer, device, dtype: str, max_length: int):
    import torch

    from .backends.hf import HFBackend
    from .models.loader import LoadedModel
    from .models.registry import ModelSpec

    spec = ModelSpec(name=name, id=name, source="local", kind="std", dtype=dtype, template="cpu-debug")
    return HFBackend(LoadedModel(spec=spec, model=model, tokenizer=tokenizer, device=torch.device(device),
                                 max_length=max_length, revision="random-init"))


# ---------------------------------------------------------------- (a) contract
def _plain_logprob(model, ids: list[int], choice: list[int], device) -> float:
    import torch

    full = torch.tensor([ids + choice], device=device)
    with torch.inference_mode():
        lsm = model(full).logits[0].float().log_softmax(-1)
    return float(sum(lsm[len(ids) - 1 + j, choice[j]] for j in range(len(choice))))


def contract(be, dtype: str) -> dict:
    import torch

    from .engine import ChoiceRequest, CurveRequest
    from .prompts import encode_piece, encode_prompt

    tok, model, dev = be.tokenizer, getattr(be.model, "module", be.model), be.device
    prompts = ["I picked a random number between 1 and 10 and it was",
               "After a long day at the office I went home, found a coin in my pocket, tossed it, and it landed on",
               "Coin:"]
    choices = [encode_piece(tok, c) for c in (" heads", " tails", " 10.")]
    ctxs = [encode_prompt(tok, p) for p in prompts]
    got = be.score_choices([ChoiceRequest(c, choices) for c in ctxs])
    ref = [[_plain_logprob(model, c, ch, dev) for ch in choices] for c in ctxs]
    d_choice = float(np.abs(np.array(got) - np.array(ref)).max())
    seq = encode_prompt(tok, "Here are my coin flips:")
    start = len(seq) - 1
    for o in (" heads", " tails", " heads", " heads", " tails"):
        seq += encode_piece(tok, o + ",")
    pos = list(range(start, len(seq) - 1, 2))
    curve = be.score_curves([CurveRequest(seq, pos, choices[:2])])[0]
    with torch.inference_mode():
        lsm = model(torch.tensor([seq], device=dev)).logits[0].float().log_softmax(-1).cpu()
    ref_curve = np.array([[float(lsm[p, ch[0]]) for ch in choices[:2]] for p in pos])
    d_curve = float(np.abs(curve - ref_curve).max())
    greedy = be.generate(ctxs[:2], 6, seeds=[0, 1], temperature=0, stop_at_eos=False)
    same = 0
    for c, g in zip(ctxs[:2], greedy):
        with torch.inference_mode():
            r = model.generate(torch.tensor([c], device=dev), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                               pad_token_id=be.scorer.pad_id)[0, len(c):].tolist()
        same += int(r == g)
    att = be.attention_mass(seq, [len(seq) - 1], {"all": list(range(len(seq)))})["all"][0]
    tol = TOL[dtype]
    ok = d_choice <= tol and d_curve <= tol and abs(att - 1) < 1e-3 and (dtype != "float32" or same == 2)
    return {"model": be.model_name, "dtype": dtype, "device": str(dev), "max_abs_dlogprob_choices": d_choice,
            "max_abs_dlogprob_curve": d_curve, "greedy_identical_to_hf_generate": f"{same}/2",
            "attention_mass_all": float(att), "tolerance": tol, "ok": bool(ok)}


def contract_checks(device: torch.device, tok) -> list[dict]:
    from .backends import load_backend
    from .models.registry import get_model_spec

    out = []
    for dtype in ("float32", "bfloat16"):
        spec = get_model_spec("tiny-random").model_copy(update={"dtype": dtype})
        out.append(contract(load_backend(spec, device=device), dtype))
        model = random_llama(SMALL_LLAMA, tok, dtype, device)
        out.append(contract(_loaded("random-small-llama", model, tok, device, dtype, 4096), dtype))
        del model
    return out


# ---------------------------------------------------------------- (b) throughput
def _param_counts(model) -> tuple[int, int]:
    """(all parameters, parameters touched per scored token: all but embeddings and the output layer)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    return total, total - emb


def _flops(rows_lens: list[int], body_params: int, n_layers: int, hidden: int) -> float:
    """Forward FLOPs: 2·N_body per token plus causal attention 2·L·T²·d per sequence (QKᵀ and AV)."""
    return float(sum(2 * body_params * t + 2 * n_layers * t * t * hidden for t in rows_lens))


def device_peak(name: str) -> tuple[str, float, float] | None:
    """(card, dense bf16 TFLOP/s, fp32 TFLOP/s) of a device name (``torch.cuda.get_device_name``), or None."""
    for keys, card, bf16, fp32 in PEAK_TFLOPS:
        if all(k in name for k in keys):
            return card, bf16, fp32
    return None


def peak_flops(device: torch.device, dtype: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of ``device`` for ``dtype`` (bf16/fp16 tensor cores, or fp32); ``override_tflops``: the bf16 figure."""
    import torch

    if override_tflops and dtype != "float32":
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    got = device_peak(torch.cuda.get_device_name(device))
    if got is None:
        return None
    return (got[2] if dtype == "float32" else got[1]) * 1e12


def scoring_throughput(be, n_ctx: int, len_range: tuple[int, int], peak: float | None, batch_tokens: int = 8192,
                       seed: int = 0) -> dict:
    """Needle-like scoring: ``n_ctx`` contexts, one read per row (1–3 token choices), ``batch_tokens`` batches."""
    import torch

    from .engine import ChoiceRequest, _batches

    model = getattr(be.model, "module", be.model)
    cfg = model.config
    rng = np.random.default_rng(seed)
    vocab = min(len(be.tokenizer), cfg.vocab_size)
    ctxs = [rng.integers(100, vocab, int(rng.integers(*len_range))).tolist() for _ in range(n_ctx)]
    choices = [rng.integers(100, vocab, k).tolist() for k in (1, 1, 1, 1, 2, 2, 3)]  # needle-like 1–3 token choices
    reqs = [ChoiceRequest(c, choices) for c in ctxs]
    sc = be.scorer
    sc.batch_tokens = batch_tokens
    sc.score_choices(reqs[:2])  # warm-up
    sc.stats.reset()
    t = _now()
    sc.score_choices(reqs)
    t_eng = _now() - t
    eng_tokens = sc.stats.real_tokens  # contexts + choice continuations actually fed
    ctx_tokens = sum(map(len, ctxs))
    batches = _batches([len(c) for c in ctxs], sc.batch_tokens, sc.max_batch, sc.max_padding)
    t = _now()
    for b in batches:
        rows = [ctxs[i] for i in b]
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), sc.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.inference_mode():
            model(input_ids=ids.to(be.device), attention_mask=mask.to(be.device), logits_to_keep=1)
    t_raw = _now() - t
    _, body = _param_counts(model)
    flops = _flops([len(c) for c in ctxs], body, cfg.num_hidden_layers, cfg.hidden_size)
    out = {"contexts": n_ctx, "context_tokens": ctx_tokens, "engine_tokens_fed": eng_tokens,
           "batch_tokens": batch_tokens, "engine_s": t_eng, "raw_s": t_raw,
           "engine_tokens_per_s": ctx_tokens / t_eng, "raw_tokens_per_s": ctx_tokens / t_raw,
           "efficiency_engine_over_raw": t_raw / t_eng, "engine_forward_calls": sc.stats.forward_calls,
           "padding_fraction": sc.stats.padding_fraction, "model_tflops_per_s_engine": flops / t_eng / 1e12}
    if peak:
        out.update(mfu_engine=flops / t_eng / peak, mfu_raw=flops / t_raw / peak, peak_tflops=peak / 1e12)
    return out


def curve_throughput(be, n_rows: int, n_tokens: int, peak: float | None, batches: int = 1) -> dict:
    """Every position read (the Markov shape): ``batches`` batches of ``n_rows`` × ``n_tokens``, 4 choices,
    engine vs bare forward + float32 log-softmax + gather (:mod:`bayesflip.bench_reads`); tokens/s,
    MFU (body + the output layer at every read), host syncs + copies per forward."""
    from .bench_generate import SyncCounter
    from .bench_reads import bare_every_position, chain_rows
    from .engine import CurveRequest

    model = getattr(be.model, "module", be.model)
    cfg = model.config
    sc = be.scorer
    rows, states = chain_rows(be.tokenizer, n_rows * batches, n_tokens)
    choices = [[s] for s in states]
    reqs = [CurveRequest(r, list(range(len(r))), choices) for r in rows]
    sc.batch_tokens, sc.max_batch, sc.max_padding = n_rows * n_tokens, n_rows, 1.0
    sc.score_curves([CurveRequest(r[:64], list(range(64)), choices) for r in rows[:n_rows]])  # warm-up
    counter = SyncCounter()
    calls0 = sc.stats.forward_calls
    t = _now()
    with counter.patch():
        got = sc.score_curves(reqs)
    t_eng = _now() - t
    forwards = sc.stats.forward_calls - calls0
    t = _now()
    diff = 0.0
    for i in range(0, len(rows), n_rows):
        ref = bare_every_position(model, rows[i: i + n_rows], states, sc.pad_id, be.device)
        diff = max(diff, max(float(np.abs(g - ref[j, : len(rows[i + j])]).max()) for j, g in enumerate(got[i: i + n_rows])))
    t_bare = _now() - t
    tokens = sum(map(len, rows))
    _, body = _param_counts(model)
    head = 2 * cfg.hidden_size * cfg.vocab_size * tokens          # the output layer at every read
    flops = _flops(list(map(len, rows)), body, cfg.num_hidden_layers, cfg.hidden_size) + head
    out = {"rows": len(rows), "tokens_per_row": n_tokens, "tokens": tokens, "engine_s": t_eng, "bare_s": t_bare,
           "engine_tokens_per_s": tokens / t_eng, "bare_tokens_per_s": tokens / t_bare, "efficiency": t_bare / t_eng,
           "max_abs_diff_vs_bare": diff, "forward_calls": forwards, "read_dtype": sc.read_dtype,
           "syncs_and_copies_per_forward": counter.per(forwards)["syncs_and_copies"],
           "model_tflops_per_s_engine": flops / t_eng / 1e12}
    if peak:
        out.update(mfu_engine=flops / t_eng / peak, peak_tflops=peak / 1e12)
    return out


def generation_throughput(be, n_rows: int, prompt_len: int, max_new_tokens: int, repeats: int = 1,
                          plain: bool = False) -> dict:
    """Sampled generation with two stop strings and EOS on (the generating families), engine vs HF
    ``generate(stop_strings=...)`` on the same tokens (:func:`bayesflip.bench_generate.bench_generate_stops`);
    ``plain``: also greedy / sampled without stops (:func:`bayesflip.bench_generate.bench_generate`)."""
    from .bench_generate import bench_generate, bench_generate_stops

    rng = np.random.default_rng(1)
    vocab = min(len(be.tokenizer), getattr(be.model, "module", be.model).config.vocab_size)
    prompts = [rng.integers(100, vocab, prompt_len + i).tolist() for i in range(n_rows)]
    out = {"stops": bench_generate_stops(be.lm, prompts=prompts, max_new_tokens=max_new_tokens, repeats=repeats,
                                         modes=("sampled",), hf_own=False)}
    if plain:
        out.update(bench_generate(be.lm, prompts=prompts, max_new_tokens=max_new_tokens, repeats=repeats))
    return out


def measure(device: torch.device, tok, shape: dict, name: str, dtype: str, work: dict, peak_tflops: float | None) -> dict:
    """Build a random model of ``shape`` in ``dtype`` and measure the three kinds of work sized by ``work``."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t = _now()
    model = random_llama(shape, tok, dtype, device)
    build_s = _now() - t
    be = _loaded(name, model, tok, device, dtype, 8192)
    total, body = _param_counts(model)
    peak = peak_flops(device, dtype, peak_tflops)
    out = {"model_shape": name, "dtype": dtype, "parameters": total, "body_parameters": body, "build_s": build_s,
           "peak_tflops": peak / 1e12 if peak else None}
    out["scoring"] = scoring_throughput(be, work["score_contexts"], work["score_lengths"], peak, work["batch_tokens"])
    out["curve"] = curve_throughput(be, work["curve_rows"], work["curve_tokens"], peak, work.get("curve_batches", 1))
    out["generation"] = generation_throughput(be, work["gen_rows"], work["gen_prompt"], work["gen_new"],
                                              plain=work.get("plain_generation", False))
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del be, model
    return out


# the workload of each measured model: job shapes, sized to keep the whole check to a few minutes
WORK_8B_BF16 = dict(score_contexts=192, score_lengths=(256, 2048), batch_tokens=8192, curve_rows=8, curve_tokens=1000,
                    curve_batches=4, gen_rows=32, gen_prompt=512, gen_new=128, plain_generation=True)
WORK_8B_FP32 = dict(score_contexts=24, score_lengths=(256, 1024), batch_tokens=8192, curve_rows=2, curve_tokens=1000,
                    gen_rows=16, gen_prompt=256, gen_new=32)
WORK_SMALL = dict(score_contexts=192, score_lengths=(256, 2048), batch_tokens=8192, curve_rows=8, curve_tokens=1000,
                  curve_batches=2, gen_rows=32, gen_prompt=512, gen_new=128)
WORK_TINY = dict(score_contexts=12, score_lengths=(32, 160), batch_tokens=2048, curve_rows=2, curve_tokens=128,
                 gen_rows=4, gen_prompt=24, gen_new=6, plain_generation=True)
WORK_TINY_FP32 = dict(score_contexts=6, score_lengths=(32, 96), batch_tokens=2048, curve_rows=2, curve_tokens=96,
                      gen_rows=3, gen_prompt=16, gen_new=4)


def throughput(device: torch.device, tok, tiny: bool, peak_tflops: float | None) -> dict:
    """bf16 and float32 figures of the reference shape (8B; ``tiny``: the small Llama), and bf16 of a small model."""
    if tiny:
        return {"bfloat16": measure(device, tok, SMALL_LLAMA, "small-llama (--tiny)", "bfloat16", WORK_TINY, peak_tflops),
                "float32": measure(device, tok, SMALL_LLAMA, "small-llama (--tiny)", "float32", WORK_TINY_FP32,
                                   peak_tflops)}
    return {"bfloat16": measure(device, tok, LLAMA_8B, "llama-3.1-8b", "bfloat16", WORK_8B_BF16, peak_tflops),
            "float32": measure(device, tok, LLAMA_8B, "llama-3.1-8b", "float32", WORK_8B_FP32, peak_tflops),
            "small": measure(device, tok, SMOL_135M, "smollm2-135m", "bfloat16", WORK_SMALL, peak_tflops)}


def _rates(m: dict) -> dict:
    """The planner's per-kind figures of one measured model (tokens/s of the engine)."""
    return {"score_tokens_per_s": m["scoring"]["engine_tokens_per_s"],
            "curve_tokens_per_s": m["curve"]["engine_tokens_per_s"],
            "gen_tokens_per_s": m["generation"]["stops"]["sampled"]["engine_tokens_per_s"],
            "ref_params_b": m["parameters"] / 1e9}


def calibration(thr: dict) -> dict:
    """The calibration block for one GPU (the job template's ``throughput`` keys, per kind and dtype)."""
    doc = {**_rates(thr["bfloat16"]), "dtype": "bfloat16"}
    fp32 = _rates(thr["float32"])
    doc["float32"] = {k: v for k, v in fp32.items() if k != "ref_params_b"}
    if "small" in thr:
        doc["small"] = _rates(thr["small"])
    return doc


# ---------------------------------------------------------------- main
def machine(device: torch.device) -> dict:
    import torch

    from .store import library_versions

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(device),
            "versions": library_versions()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, gpus_visible=torch.cuda.device_count(),
                    cuda=torch.version.cuda)
        got = device_peak(p.name)
        info["peak"] = ({"card": got[0], "bf16_tflops": got[1], "fp32_tflops": got[2]} if got else
                        "unknown card: MFU not reported (give --peak-tflops)")
    return info


def gpu_templates() -> list[str]:
    """Every job template that asks for GPUs."""
    from .hpc.templates import load_template, template_names

    return [n for n in template_names() if load_template(n).gpus_per_node > 0]


def template_figures(doc: dict, template) -> dict:
    """``doc`` (one GPU) for ``template``: as measured for a one-GPU template; for N GPUs (tensor
    parallel) every rate × N × :data:`TP_EFFICIENCY` (an assumption, marked ``derived``)."""
    n = template.gpus_per_node * template.nodes
    if n <= 1:
        return {**doc, "derived": False}

    def scale(d: dict) -> dict:
        return {k: (v * n * TP_EFFICIENCY[k] if k in TP_EFFICIENCY else v) for k, v in d.items()}

    out = scale(doc)
    for k in ("float32", "small"):
        if k in doc:
            out[k] = scale(doc[k])
    out["derived"] = (f"one-GPU gpu-check × {n} GPUs × assumed TP efficiency "
                      + ", ".join(f"{k.split('_')[0]} {v}" for k, v in TP_EFFICIENCY.items()))
    return out


def write_calibration(res: dict, template: str) -> Path:
    """Write ``res["calibration"]["throughput"]`` (one GPU; scaled for a multi-GPU template) to the planner's
    calibration file of ``template``."""
    from .hpc.cost import calibration_path
    from .hpc.templates import load_template

    t = load_template(template)                 # an unknown template is a ConfigError naming the allowed ones
    path = calibration_path(template)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**template_figures(res["calibration"]["throughput"], t), "template": template,
           "device": res["calibration"]["device"],
           "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": res.get("git_commit")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=float))
    tmp.replace(path)
    return path


def resolve_device(device: str | None):
    """The device to check: CUDA unless ``device`` says otherwise; no usable CUDA device is a DeviceError."""
    import torch

    from .backends.distributed import DeviceError

    dev = torch.device(device or "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"gpu-check needs a CUDA device and this node has none usable (torch {torch.__version__}"
                          f"{'' if torch.version.cuda else ', built without CUDA'}; torch.cuda.is_available() is "
                          f"False, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); run it "
                          f"on a GPU node, or pass --device cpu (add --tiny: the 8B shape takes hours on a CPU)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def run(device: str | None = None, tiny: bool = False, out: str | Path | None = None,
        peak_tflops: float | None = None, template: str | None = None) -> dict:
    t0 = time.perf_counter()
    dev = resolve_device(device)
    if template == "all":
        template = ",".join(gpu_templates())
    elif template is None and not tiny and dev.type == "cuda":
        template = ",".join(gpu_templates())
    tok = _tokenizer()
    res: dict = {"machine": machine(dev), "tiny": tiny}
    t = time.perf_counter()
    res["contract"] = contract_checks(dev, tok)
    res["contract_ok"] = all(c["ok"] for c in res["contract"])
    res["contract_s"] = time.perf_counter() - t
    t = time.perf_counter()
    res["throughput"] = throughput(dev, tok, tiny, peak_tflops)
    res["throughput_s"] = time.perf_counter() - t
    thr = res["throughput"]["bfloat16"]
    res["calibration"] = {
        "device": res["machine"].get("gpu", str(dev)), "model_shape": thr["model_shape"],
        "scoring_tokens_per_s": thr["scoring"]["engine_tokens_per_s"],
        "curve_tokens_per_s": thr["curve"]["engine_tokens_per_s"],
        "generation_tokens_per_s": thr["generation"]["stops"]["sampled"]["engine_tokens_per_s"],
        "note": "tokens/s of the engine on one device, per kind of work and dtype; the planner interpolates "
                "between the small and the reference size and scales beyond (bayesflip.hpc.cost.kind_speed)",
        "throughput": calibration(res["throughput"])}
    try:
        from .store import git_commit

        res["git_commit"] = git_commit()
    except Exception:  # noqa: BLE001
        res["git_commit"] = None
    res["wall_s"] = time.perf_counter() - t0
    if template:
        res["calibration"]["written_to"] = [str(write_calibration(res, n.strip())) for n in template.split(",")
                                            if n.strip()]
    path = Path(out or "results/gpu_check/gpu_check.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, default=float))
    return res


def summary(res: dict) -> str:
    lines = [f"gpu-check on {res['calibration']['device']} ({res['wall_s']:.0f} s)"]
    for c in res["contract"]:
        lines.append(f"  contract {c['model']:20s} {c['dtype']:9s} choices {c['max_abs_dlogprob_choices']:.2e} "
                     f"curve {c['max_abs_dlogprob_curve']:.2e} greedy {c['greedy_identical_to_hf_generate']} "
                     f"{'ok' if c['ok'] else 'FAILED'}")
    def mfu(d: dict) -> str:
        return f", MFU {d['mfu_engine']:.2f}" if d.get("mfu_engine") is not None else ""

    for m in res["throughput"].values():
        s, c, g = m["scoring"], m["curve"], m["generation"]["stops"]["sampled"]
        lines.append(f"  {m['model_shape']} {m['dtype']}:")
        lines.append(f"    scoring  {s['engine_tokens_per_s']:.0f} tok/s (raw forward {s['raw_tokens_per_s']:.0f}, "
                     f"efficiency {s['efficiency_engine_over_raw']:.2f}{mfu(s)})")
        lines.append(f"    curve    {c['engine_tokens_per_s']:.0f} tok/s every position read (bare {c['bare_tokens_per_s']:.0f}, "
                     f"efficiency {c['efficiency']:.2f}{mfu(c)}), {c['syncs_and_copies_per_forward']:.1f} syncs+copies/forward")
        lines.append(f"    generate sampled+stops {g['engine_tokens_per_s']:.0f} tok/s vs HF {g['hf_tokens_per_s']:.0f} "
                     f"(x{g['ratio_engine_over_hf']:.2f}, same tokens {g['tokens_identical_to_hf']})")
        for mode in ("greedy", "sampled"):
            if mode in m["generation"]:
                x = m["generation"][mode]
                lines.append(f"    generate {mode:7s} (no stops) engine {x['engine_tokens_per_s']:.0f} tok/s vs HF "
                             f"{x['hf_tokens_per_s']:.0f} (x{x['ratio_engine_over_hf']:.2f}), host syncs/step "
                             f"{x['host_syncs_per_step']:.1f}")
        if "peak_memory_gib" in m:
            lines.append(f"    peak memory {m['peak_memory_gib']:.1f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bayesflip gpu-check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    a = ap.parse_args(argv)
    return gpu_check_cli(a)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default=None, help="cuda (default; exits 2 without a usable CUDA device) or cpu")
    ap.add_argument("--tiny", action="store_true", help="small random Llama instead of the 8B shape (CPU, tests)")
    ap.add_argument("--out", default=None, help="JSON file (default results/gpu_check/gpu_check.json)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s for MFU "
                    "(default: looked up from the device name)")
    ap.add_argument("--template", default=None, help="job template(s) this run calibrates, comma-separated, or 'all' "
                    "($BAYESFLIP_CACHE/throughput/<template>.json; default on CUDA: every GPU template, none with --tiny)")


def gpu_check_cli(args) -> int:
    from .errors import BayesflipError

    try:
        res = run(args.device, args.tiny, args.out, args.peak_tflops, getattr(args, "template", None))
    except BayesflipError as e:
        print(f"bayesflip: error: {e}", file=sys.stderr)
        return 2
    print(summary(res))
    print(f"wrote {args.out or 'results/gpu_check/gpu_check.json'}")
    for p in res["calibration"].get("written_to", []):
        print(f"calibrated throughput for the planner: {p}")
    return 0 if res["contract_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
