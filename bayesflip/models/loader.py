"""Load a registry model once per job: weights, tokenizer, device (a backend may place it itself).

Packaged GGUF models (``source: gguf_package``) are dequantized once and cached
as a normal safetensors directory under ``$BAYESFLIP_CACHE/models/`` (outside
git); later loads take seconds. The cache is written to a temporary directory
and renamed into place, so concurrent SLURM tasks never see half a cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError
from .prepare import gguf_cache_dir, hub_snapshot, package_dir, prepared_revision, require_prepared
from .registry import ModelSpec, get_model_spec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


Placement = Callable[[Any, torch.dtype, torch.device], tuple[Any, torch.device]]


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any            # a torch.nn.Module (or a DeepSpeed InferenceEngine wrapping one)
    tokenizer: Any
    device: torch.device
    max_length: int
    revision: str         # what was actually loaded (package version, hub revision, seed)

    @property
    def name(self) -> str:
        return self.spec.name


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    if spec.source == "gguf_package":
        return AutoTokenizer.from_pretrained(gguf_cache_dir(spec))
    if spec.source == "tiny_random":
        return load_tokenizer(get_model_spec(spec.tokenizer_from))  # type: ignore[arg-type]
    where, rev = _weights_location(spec)
    return AutoTokenizer.from_pretrained(where, revision=rev, trust_remote_code=spec.trust_remote_code)


def _build_tiny_random(spec: ModelSpec, tokenizer) -> torch.nn.Module:
    """A seeded random model on ``tokenizer``: 2-layer GPT-2 (``tiny_arch: gpt2``) or Llama (``llama``:
    the architecture DeepSpeed AutoTP shards). Same seed, same weights in every process (TP ranks)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

    cfg: Any                       # LlamaConfig or GPT2Config, the one cls takes (mypy narrows a union per branch)
    cls: type[PreTrainedModel]
    if spec.tiny_arch == "llama":
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=spec.max_length or 512,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          tie_word_embeddings=False)
        cls = LlamaForCausalLM
    else:
        cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_head=2, n_embd=64,
                         n_positions=spec.max_length or 512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
        cls = GPT2LMHeadModel
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = cls(cfg)
    torch.random.set_rng_state(gen_state)
    return model


_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


def _to_float32_input(module, args, kwargs):
    if args and torch.is_tensor(args[0]) and args[0].is_floating_point():
        args = (args[0].float(), *args[1:])
    return args, kwargs


def apply_fp32_head(model, spec: ModelSpec) -> None:
    """``fp32_head``: run the final norm and the output layer in float32 (the rest stays in bf16/fp16).

    The norm's weights become float32 and its input is upcast, so the normalised hidden state is
    never rounded to bf16; the output layer gets its own float32 weights (a tied embedding is
    untied: the input embedding keeps the low-precision copy) and a float32 input.
    """
    hf = getattr(model, "module", model)
    head = hf.get_output_embeddings()
    base = hf.get_decoder() if hasattr(hf, "get_decoder") else hf.base_model
    norm = next((getattr(base, n) for n in _FINAL_NORMS if isinstance(getattr(base, n, None), torch.nn.Module)), None)
    if head is None or norm is None or not hasattr(head, "weight"):
        raise ConfigError(f"models.{spec.name}.fp32_head", f"no final norm / output layer found in "
                          f"{type(hf).__name__} (looked for {', '.join(_FINAL_NORMS)})", allowed=[False])
    norm.float()
    norm.register_forward_pre_hook(_to_float32_input, with_kwargs=True)
    head.weight = torch.nn.Parameter(head.weight.detach().float().clone(), requires_grad=False)
    if getattr(head, "bias", None) is not None:
        head.bias = torch.nn.Parameter(head.bias.detach().float().clone(), requires_grad=False)
    head.register_forward_pre_hook(_to_float32_input, with_kwargs=True)


def _input_device(model) -> torch.device:
    """Where input ids go: the input embedding's device (the first GPU of a ``device_map`` model)."""
    emb = model.get_input_embeddings()
    return emb.weight.device


def load_model(name_or_spec: str | ModelSpec, device: torch.device | str | None = None,
               dtype: str | None = None, place: Placement | None = None) -> LoadedModel:
    """Load weights + tokenizer for a registry entry, in eval mode, on ``device``.

    ``place``: how the backend places the model read on the CPU — ``place(model, torch_dtype,
    device) -> (model, input_device)`` (e.g. :func:`bayesflip.backends.deepspeed.deepspeed_wrap`:
    memory-mapped safetensors, no copy to the GPU, each rank's shard moved to ``device``). Default:
    ``device_map: auto`` models are spread by accelerate over all visible GPUs (``device`` is then
    where the input embedding lives), others are moved to ``device``. ``fp32_head`` applies after
    placement. Hub models come from the local Hub cache when prepared (``bayesflip models
    prepare``), pinned to the recorded commit. The loader never asks which backend runs.
    """
    spec = get_model_spec(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = DTYPES[dtype or spec.dtype]
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(spec)
    kw: dict[str, Any] = {}
    if spec.device_map is not None:
        kw["device_map"] = spec.device_map
    model: torch.nn.Module
    if spec.source == "gguf_package":
        _, version = package_dir(spec)
        model = AutoModelForCausalLM.from_pretrained(gguf_cache_dir(spec), dtype=torch_dtype,
                                                     attn_implementation=spec.attn_implementation, **kw)
        revision = f"{spec.package}=={version}"
    elif spec.source == "tiny_random":
        model = _build_tiny_random(spec, tokenizer).to(torch_dtype)
        revision = spec.revision
    else:
        where, rev = _weights_location(spec)
        model = AutoModelForCausalLM.from_pretrained(
            where, revision=rev, dtype=torch_dtype, attn_implementation=spec.attn_implementation,
            trust_remote_code=spec.trust_remote_code, **kw)
        revision = _resolved_revision(spec, model)
    model.eval()
    max_length = spec.max_length or config_context(model.config)
    if place is not None:
        model, device = place(model, torch_dtype, device)
    elif spec.device_map is not None:
        device = _input_device(model)
    else:
        model.to(device)
    if spec.fp32_head:
        apply_fp32_head(model, spec)
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, device=device,
                       max_length=int(max_length), revision=str(revision))


def config_context(cfg) -> int:
    """A model config's context window: ``max_position_embeddings``, else ``n_positions``, else 2048."""
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


def context_length(spec: ModelSpec) -> int:
    """The context window :func:`load_model` gives the engine, read without the weights (config only):
    the registry's ``max_length``, else the model config's (tiny-random: 512)."""
    if spec.max_length:
        return int(spec.max_length)
    if spec.source == "tiny_random":
        return 512
    from transformers import AutoConfig

    if spec.source == "gguf_package":
        return config_context(AutoConfig.from_pretrained(gguf_cache_dir(spec)))
    where, rev = _weights_location(spec)
    return config_context(AutoConfig.from_pretrained(where, revision=rev, trust_remote_code=spec.trust_remote_code))


def _weights_location(spec: ModelSpec) -> tuple[str, str | None]:
    """(path or Hub id, revision) for ``from_pretrained``: a Hub model loads from its prepared snapshot,
    never from the network (an unprepared one raises the one-line error naming ``bayesflip models prepare``)."""
    if spec.source != "hub":
        return spec.id, None
    snap = hub_snapshot(spec)
    if snap is None:
        require_prepared(spec)
    return str(snap), None


def _resolved_revision(spec: ModelSpec, model) -> str:
    if spec.source == "hub":
        sha = prepared_revision(spec)
        if sha:
            return sha
    return getattr(model.config, "_commit_hash", None) or spec.revision
