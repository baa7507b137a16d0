"""``bayesflip gpu-check``: one prepared script for a fresh GPU machine (< 5 minutes, nothing downloaded).

    python -m bayesflip.gpu_check [--device cuda] [--tiny] [--out results/gpu_check.json]

Writes one JSON file with

(a) ``contract`` — the engine on this device against plain forward passes, for the tiny random
    GPT-2 of the registry and a randomly initialised small Llama (built from a config in this
    file), in float32 and bfloat16: choice log-probs (multi-token choices included), a learning
    curve, greedy generation vs ``model.generate``, attention mass. float32 must agree to 1e-4;
    bfloat16 deviations are reported against a looser bound (different kernels / batch shapes
    round differently in bf16).
(b) ``throughput`` — a randomly initialised Llama-3.1-8B-shaped model (``--tiny``: the small
    Llama) in bfloat16: engine scoring tokens/s on needle-like batches (long contexts, 1–3 token
    choices) vs a raw ``model(input_ids, logits_to_keep=1)`` over the same padded batches, model-FLOP
    utilisation of both (when the device's peak is known or ``--peak-tflops`` is given), engine
    generation vs ``model.generate`` (greedy and sampled, host syncs per step) and peak memory.
(c) ``calibration`` — tokens/s for scoring and for generation, for the planner's time estimates
    (:mod:`bayesflip.cost`): its ``throughput`` block (the job template's units: ``score_tokens_per_s``,
    ``gen_tokens_per_s``, ``ref_params_b``) is also written to ``$BAYESFLIP_CACHE/throughput/<template>.json``
    (``--template``, default ``gpu-small`` for a full run on CUDA, none with ``--tiny``), which
    ``bayesflip plan --dry-run`` and ``submit`` then use instead of the template's default figures.

``--device cpu --tiny`` runs the same code on the CPU in well under a minute (tests use it).
The tokenizer is the embedded SmolLM2's (installed by ``make install``); weights are random.
"""

from __future__ import annotations

# torch is imported inside the functions that run checks, so that building the CLI parser
# (``add_arguments``) does not import it: every ``bayesflip`` command pays for that import.

import argparse
import json
import platform
import time
import sys
from pathlib import Path

import numpy as np

SMALL_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False)
# meta-llama/Llama-3.1-8B config.json (shapes only; rope scaling omitted: it does not change cost)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, vocab_size=128256,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0,
                    "L40": 181.0, "A6000": 155.0, "A40": 150.0, "A10": 125.0, "L4": 121.0, "V100": 125.0}
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


def _peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    import torch
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def scoring_throughput(be, n_ctx: int, len_range: tuple[int, int], peak: float | None, batch_tokens: int,
                       seed: int = 0) -> dict:
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


def throughput(device: torch.device, tok, tiny: bool, peak_tflops: float | None) -> dict:
    import torch
    from .bench_generate import bench_generate

    shape = SMALL_LLAMA if tiny else LLAMA_8B
    dtype = "bfloat16"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = _now()
    model = random_llama(shape, tok, dtype, device)
    build_s = _now() - t
    be = _loaded("random-small-llama" if tiny else "random-llama-3.1-8b", model, tok, device, dtype, 8192)
    total, body = _param_counts(model)
    peak = _peak_flops(device, peak_tflops)
    if tiny:
        score = scoring_throughput(be, 12, (32, 160), peak, batch_tokens=2048)
        gen_prompts, new = [list(range(200, 200 + 24 + i)) for i in range(4)], 6
    else:
        score = scoring_throughput(be, 192, (256, 2048), peak, batch_tokens=16384)
        gen_prompts, new = [list(range(1000 + i, 1512 + i)) for i in range(32)], 128
    gen = bench_generate(be.lm, prompts=gen_prompts, max_new_tokens=new)
    out = {"model_shape": "small-llama (--tiny)" if tiny else "llama-3.1-8b", "dtype": dtype,
           "parameters": total, "body_parameters": body, "build_s": build_s, "scoring": score, "generation": gen}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del be, model
    return out


# ---------------------------------------------------------------- main
def machine(device: torch.device) -> dict:
    import torch
    from .store import library_versions

    info = {"platform": platform.platform(), "cpus": __import__("os").cpu_count(), "device": str(device),
            "versions": library_versions()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, gpus_visible=torch.cuda.device_count(),
                    cuda=torch.version.cuda)
    return info


def write_calibration(res: dict, template: str) -> Path:
    """Write ``res["calibration"]["throughput"]`` to the planner's calibration file of ``template``."""
    from .cost import calibration_path
    from .hpc.templates import load_template

    load_template(template)                     # an unknown template is a ConfigError naming the allowed ones
    path = calibration_path(template)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**res["calibration"]["throughput"], "template": template, "device": res["calibration"]["device"],
           "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": res.get("git_commit")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=float))
    tmp.replace(path)
    return path


def run(device: str | None = None, tiny: bool = False, out: str | Path | None = None,
        peak_tflops: float | None = None, template: str | None = None) -> dict:
    import torch
    from .backends.distributed import DeviceError

    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("gpu-check --device cuda: this node has no usable CUDA device")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    tok = _tokenizer()
    res: dict = {"machine": machine(dev), "tiny": tiny}
    t = time.perf_counter()
    res["contract"] = contract_checks(dev, tok)
    res["contract_ok"] = all(c["ok"] for c in res["contract"])
    res["contract_s"] = time.perf_counter() - t
    t = time.perf_counter()
    res["throughput"] = throughput(dev, tok, tiny, peak_tflops)
    res["throughput_s"] = time.perf_counter() - t
    thr = res["throughput"]
    res["calibration"] = {
        "device": res["machine"].get("gpu", str(dev)), "model_shape": thr["model_shape"], "dtype": thr["dtype"],
        "scoring_tokens_per_s": thr["scoring"]["engine_tokens_per_s"],
        "generation_tokens_per_s": thr["generation"]["greedy"]["engine_tokens_per_s"],
        "generation_batch": thr["generation"]["batch"],
        "note": "tokens/s of the engine on this device for an 8B-shaped bf16 model; scale by parameter count for others",
        # the job template's units (bayesflip.cost); load_s is not measured here (the template's stays)
        "throughput": {"score_tokens_per_s": thr["scoring"]["engine_tokens_per_s"],
                       "gen_tokens_per_s": thr["generation"]["greedy"]["engine_tokens_per_s"],
                       "ref_params_b": thr["parameters"] / 1e9}}
    try:
        from .store import git_commit

        res["git_commit"] = git_commit()
    except Exception:  # noqa: BLE001
        res["git_commit"] = None
    res["wall_s"] = time.perf_counter() - t0
    if template is None and not tiny and dev.type == "cuda":
        template = "gpu-small"
    if template:
        res["calibration"]["written_to"] = str(write_calibration(res, template))
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
    s = res["throughput"]["scoring"]
    g = res["throughput"]["generation"]
    lines.append(f"  scoring {s['engine_tokens_per_s']:.0f} tok/s (raw forward {s['raw_tokens_per_s']:.0f}, "
                 f"efficiency {s['efficiency_engine_over_raw']:.2f}" + (f", MFU {s['mfu_engine']:.2f}" if "mfu_engine" in s else "") + ")")
    for m in ("greedy", "sampled"):
        lines.append(f"  generate {m:7s} engine {g[m]['engine_tokens_per_s']:.0f} tok/s vs HF {g[m]['hf_tokens_per_s']:.0f} "
                     f"(x{g[m]['ratio_engine_over_hf']:.2f}), host syncs/step {g[m]['host_syncs_per_step']:.1f}")
    if "peak_memory_gib" in res["throughput"]:
        lines.append(f"  peak memory {res['throughput']['peak_memory_gib']:.1f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bayesflip gpu-check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    a = ap.parse_args(argv)
    return gpu_check_cli(a)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny", action="store_true", help="small random Llama instead of the 8B shape (CPU, tests)")
    ap.add_argument("--out", default=None, help="JSON file (default results/gpu_check/gpu_check.json)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s for MFU")
    ap.add_argument("--template", default=None, help="job template whose throughput this run calibrates "
                    "($BAYESFLIP_CACHE/throughput/<template>.json; default gpu-small on CUDA, none with --tiny)")


def gpu_check_cli(args) -> int:
    from .errors import BayesflipError

    try:
        res = run(args.device, args.tiny, args.out, args.peak_tflops, getattr(args, "template", None))
    except BayesflipError as e:
        print(f"bayesflip: error: {e}", file=sys.stderr)
        return 2
    print(summary(res))
    print(f"wrote {args.out or 'results/gpu_check/gpu_check.json'}")
    if res["calibration"].get("written_to"):
        print(f"calibrated throughput for the planner: {res['calibration']['written_to']}")
    return 0 if res["contract_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
