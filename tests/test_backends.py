"""Backends: the interface over the one engine, the registry mechanism, capabilities, fp32_head,
DeepSpeed tensor parallelism (2 CPU ranks, gloo) against single-process hf, device checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bayesflip.backends import BACKENDS, ATTENTION_MASS, check_requirements, load_backend
from bayesflip.backends.base import Backend, CapabilityError
from bayesflip.backends.distributed import DeviceError, check_device
from bayesflip.engine import ChoiceRequest, Scorer
from bayesflip.errors import ConfigError
from bayesflip.models.registry import ModelSpec, get_model_spec
from bayesflip.prompts import encode_piece, encode_prompt
from bayesflip.registry import DuplicateNameError, Registry
from conftest import plain_choice_logprob

REPO = Path(__file__).resolve().parent.parent


def test_registry_mechanism():
    r = Registry("widget")
    r.register("a", 1)

    @r.register("b")
    def b():
        return 2

    r.register_lazy("json", "json:dumps")
    assert r.names() == ["a", "b", "json"] and "json" in r and r.get("json") is json.dumps and r.get("b") is b
    with pytest.raises(DuplicateNameError, match="widget 'a' is registered twice"):
        r.register("a", 3)
    with pytest.raises(DuplicateNameError):
        r.register_lazy("json", "json:loads")
    with pytest.raises(ConfigError, match=r"unknown widget 'zzz' \(allowed: a, b, json\)"):
        r.get("zzz")
    assert BACKENDS.names() == ["deepspeed", "hf"]


def test_unknown_backend_in_registry_entry_is_a_config_error(tmp_path):
    from bayesflip.models.registry import parse_model_file

    f = tmp_path / "x.yaml"
    f.write_text("models:\n  m:\n    id: a/b\n    kind: std\n    backend: vllm\n")
    with pytest.raises(ConfigError, match=r"models\.m\.backend.*unknown backend 'vllm'.*deepspeed, hf"):
        parse_model_file(f)
    f.write_text("models:\n  m:\n    id: a/b\n    kind: std\n    backend: deepspeed\n    device_map: auto\n")
    with pytest.raises(ConfigError, match="device_map needs backend: hf"):
        parse_model_file(f)


def test_hf_backend_delegates_to_the_engine(tiny):
    be = load_backend(get_model_spec("tiny-random"), device="cpu")
    assert isinstance(be, Backend) and be.name == "hf" and be.model_name == "tiny-random"
    assert (be.rank, be.world_size, be.is_writer) == (0, 1, True) and ATTENTION_MASS in be.capabilities
    assert be.revision == "seed0" and be.max_length == 512 and str(be.device) == "cpu"
    tok = be.tokenizer
    prompt = "I tossed a coin and it landed on"
    req = [ChoiceRequest(encode_prompt(tok, prompt), [encode_piece(tok, c) for c in (" heads", " tails")])]
    a = be.score_choices(req)[0]
    b = Scorer(tiny).score_choices(req)[0]
    ref = [plain_choice_logprob(tiny, prompt, c) for c in (" heads", " tails")]
    assert np.abs(a - b).max() == 0 and np.abs(a - ref).max() <= 1e-4
    assert be.stats.forward_calls == 1
    ids = req[0].context
    m = be.attention_mass(ids, [len(ids) - 1], {"all": list(range(len(ids)))})
    assert abs(m["all"][0] - 1) < 1e-5
    assert be.generate([ids], 4, seeds=[1]) == Scorer(tiny).generate([ids], 4, seeds=[1])


class _NoAttention(Backend):
    name = "noattn"

    @classmethod
    def load(cls, spec, device=None, dtype=None, **kw):
        from bayesflip.models.loader import load_model

        return cls(load_model(spec, device="cpu"), **kw)


def test_capabilities_are_checked_before_and_at_run_time():
    BACKENDS.register("noattn", _NoAttention)
    try:
        spec = ModelSpec(name="x", id="tiny-random-gpt2", source="tiny_random", tokenizer_from="smollm2-135m-instruct",
                         kind="std", dtype="float32", backend="noattn", max_length=64)
        with pytest.raises(ConfigError, match=r"models\.x\.backend.*family attention needs attention_mass, which "
                                              r"backend 'noattn' does not provide \(allowed: deepspeed, hf\)"):
            check_requirements(spec, {ATTENTION_MASS}, "family attention")
        check_requirements(get_model_spec("tiny-random"), {ATTENTION_MASS})
        be = load_backend(spec)
        with pytest.raises(CapabilityError, match="no 'attention_mass' capability"):
            be.attention_mass([1, 2, 3], [2], {"a": [0]})
    finally:
        BACKENDS.unregister("noattn")


def test_check_device_gpu_template_without_cuda():
    import torch

    from bayesflip.hpc.launch import task_template
    from bayesflip.hpc.templates import load_template

    if torch.cuda.is_available():
        pytest.skip("this node has CUDA")
    spec = get_model_spec("llama-3.1-8b")
    with pytest.raises(DeviceError) as e:
        check_device(spec, load_template("gpu-small"))
    msg = str(e.value)
    assert "\n" not in msg and "job template 'gpu-small' asks for 1 GPU(s) per node" in msg and "no usable CUDA" in msg
    check_device(get_model_spec("tiny-random"), task_template(get_model_spec("tiny-random")))  # cpu-debug: fine
    assert task_template(spec, "gpu-small").name == "gpu-small" and task_template(spec, {"name": "x"}) == {"name": "x"}
    with pytest.raises(TypeError, match="resolved job template"):
        check_device(spec, "gpu-small")
    with pytest.raises(DeviceError, match="tp=2 ranks, but this process is one of 1"):
        load_backend(get_model_spec("tiny-random-llama-tp2"), device="cpu")


def test_fp32_head_keeps_body_dtype_and_unties(smol):
    import torch

    spec = get_model_spec("smollm2-135m-instruct").model_copy(update={"dtype": "bfloat16", "fp32_head": True})
    be = load_backend(spec, device="cpu")
    hf = be.model
    assert hf.lm_head.weight.dtype == torch.float32 and hf.model.norm.weight.dtype == torch.float32
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16  # untied: the body stays bf16
    assert hf.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = hf(torch.tensor([[1, 2, 3]]))
    assert out.logits.dtype == torch.float32


def _torchrun(model: str, out: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29400 + os.getpid() % 500), "-m", "bayesflip.backends.tp_check",
                        "--model", model, "--device", "cpu", "--out", str(out), *extra],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


def _compare_tp(ref_model: str, tp_model: str, out: Path, tol: float) -> None:
    from bayesflip.backends.tp_check import collect

    ranks = _torchrun(tp_model, out)
    ref = collect(load_backend(get_model_spec(ref_model), device="cpu"))
    assert [d["is_writer"] for d in ranks] == [True, False]
    assert [d["rank"] for d in ranks] == [0, 1] and {d["world_size"] for d in ranks} == {2}
    for d in ranks:
        assert d["model_class"] == "InferenceEngine"
        assert d["read_head"] == "VocabParallelReadHead"   # float32 reads, vocabulary-parallel over the 2 ranks
        assert np.abs(np.array(d["choices"]) - ref["choices"]).max() <= tol
        assert np.abs(np.array(d["curve"]) - ref["curve"]).max() <= tol
        assert d["greedy"] == ref["greedy"] and d["sampled"] == ref["sampled"]
        for k, v in ref["attention"].items():
            assert np.abs(np.array(d["attention"][k]) - v).max() <= 1e-6
        # a failure on the last rank fails the shard on every rank, with the same message
        assert d["agree_error"] == "check shard failed on rank 1 of 2: RuntimeError: injected on rank 1"


@pytest.mark.integration
def test_deepspeed_tp2_on_cpu_equals_single_process(tmp_path):
    _compare_tp("tiny-random-llama", "tiny-random-llama-tp2", tmp_path, 1e-4)


@pytest.mark.integration
def test_deepspeed_tp2_bf16_reads_in_float32(tmp_path):
    """A bf16 model under TP: the vocabulary-parallel read head all-gathers the bf16 output-layer shards
    once and reads in float32; scores agree with the single-process bf16 model's float32 reads up to the
    bf16 rounding of the TP body (its partial sums are all-reduced in bf16)."""
    from bayesflip.backends.tp_check import collect
    from bayesflip.models.registry import get_model_spec

    ranks = _torchrun("tiny-random-llama-tp2", tmp_path, "--dtype", "bfloat16")
    ref = collect(load_backend(get_model_spec("tiny-random-llama").model_copy(update={"dtype": "bfloat16"}),
                               device="cpu"))
    for d in ranks:
        assert d["read_head"] == "VocabParallelReadHead"
        assert np.abs(np.array(d["choices"]) - ref["choices"]).max() <= 1e-2
        assert np.abs(np.array(d["curve"]) - ref["curve"]).max() <= 1e-2
    assert ranks[0]["choices"] == ranks[1]["choices"]                  # every rank holds the same reads


@pytest.mark.integration
def test_deepspeed_tp2_smollm2_equals_single_process(tmp_path, smol):
    _compare_tp("smollm2-135m-instruct", "smollm2-135m-instruct-tp2", tmp_path, 1e-4)


def test_single_process_distributed_helpers(tiny, monkeypatch):
    from bayesflip.backends import backend_for
    from bayesflip.backends.distributed import agree, all_ok, dist_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    env = dist_env()
    assert (env.rank, env.world_size, env.is_writer) == (0, 1, True)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert (dist_env().rank, dist_env().world_size, dist_env().local_rank, dist_env().is_writer) == (3, 4, 3, False)
    assert all_ok(True) and not all_ok(False) and agree(lambda: 7) == 7
    with pytest.raises(KeyError):
        agree(lambda: {}["x"])
    be = backend_for(tiny)
    assert be.name == "hf" and backend_for(be) is be and be.n_layers == 2


@pytest.mark.integration
def test_device_map_auto_loads_and_scores_like_plain(smol):
    spec = get_model_spec("smollm2-135m-instruct").model_copy(update={"device_map": "auto"})
    be = load_backend(spec, device="cpu")
    assert str(be.device) == "cpu"  # one CPU: accelerate places everything there
    prompt = "I tossed a coin and it landed on"
    tok = be.tokenizer
    lp = be.score_choices([ChoiceRequest(encode_prompt(tok, prompt), [encode_piece(tok, " heads")])])[0][0]
    assert abs(lp - plain_choice_logprob(smol, prompt, " heads")) <= 1e-4
