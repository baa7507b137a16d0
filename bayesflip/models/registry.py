"""The model registry: one YAML entry per model under ``configs/models/<set>.yaml``.

Each file is a *model set* (``paper``, ``pythia``, ``local``, ...; ``MODEL_TYPE=<set>`` selects it).
``bayesflip models add`` (:mod:`bayesflip.models.add`) appends entries to ``user.yaml``. A file holds::

    models:
      <name>:
        id: google/gemma-2-2b          # Hub id, local path, or packaged GGUF
        source: hub | local | gguf_package | tiny_random
        revision: main
        kind: std | instruct
        dtype: float32 | bfloat16 | float16
        backend: hf | deepspeed         # bayesflip.backends registry
        tp: 1                           # tensor-parallel degree (deepspeed)
        device_map: auto                # hf only: one process over all visible GPUs (accelerate)
        fp32_head: true                 # final norm + output layer in float32 (bf16/fp16 models)
        read_dtype: float32 | model     # output layer at scored read positions (default float32; model: faster, bf16 logits)
        template: gpu-small             # job template in job_templates/
        params_b: 8.03                  # billions of parameters (cost estimates: load time, throughput scaling)
        active_params_b: 1.3            # optional: parameters used per token (mixture of experts); default params_b
        max_length: 8192                # optional: the context window (default: the model config's)
        attn_implementation: sdpa       # sdpa | eager (Gemma-2: eager, for logit soft-capping)
        trust_remote_code: false
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..backends import validate_spec
from ..errors import ConfigError, UnknownModelError
from ..paths import configs_dir


class ModelSpec(BaseModel):
    """One model of the registry (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    id: str
    source: Literal["hub", "local", "gguf_package", "tiny_random"] = "hub"
    revision: str = "main"
    kind: Literal["std", "instruct"]
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    backend: str = "hf"                 # a name of bayesflip.backends.BACKENDS (checked in parse_entry)
    tp: int = Field(1, ge=1)
    device_map: Optional[Literal["auto"]] = None  # hf: spread one model over all visible GPUs
    fp32_head: bool = False             # compute the final norm and the output layer in float32
    read_dtype: Literal["float32", "model"] = "float32"  # output layer at read positions (bayesflip.engine.ReadHead)
    tiny_arch: Literal["gpt2", "llama"] = "gpt2"  # tiny_random: architecture (llama supports DeepSpeed AutoTP)
    template: str = "gpu-small"
    package: Optional[str] = None       # gguf_package: the Python package carrying the file
    gguf_file: Optional[str] = None     # gguf_package: file name inside the package
    tokenizer_from: Optional[str] = None  # tiny_random: registry name whose tokenizer to use
    max_length: Optional[int] = Field(None, ge=8)  # override the config's context window
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"
    trust_remote_code: bool = False
    params_b: Optional[float] = Field(None, gt=0)         # billions of parameters (bayesflip.hpc.cost)
    active_params_b: Optional[float] = Field(None, gt=0)  # per token, for mixtures of experts (default params_b)
    model_set: str = ""

    @model_validator(mode="after")
    def _check_source(self) -> "ModelSpec":
        if self.source == "gguf_package" and not (self.package and self.gguf_file):
            raise ValueError("source gguf_package needs 'package' and 'gguf_file'")
        if self.source == "tiny_random" and not self.tokenizer_from:
            raise ValueError("source tiny_random needs 'tokenizer_from'")
        return self


def _format_validation(err: ValidationError) -> tuple[str, str, list | None]:
    e = err.errors()[0]
    key = ".".join(str(x) for x in e["loc"]) or "<root>"
    allowed = None
    ctx = e.get("ctx") or {}
    if "expected" in ctx:
        allowed = [ctx["expected"]]
    return key, e["msg"], allowed


def parse_model_file(path: Path) -> dict[str, ModelSpec]:
    raw = yaml.safe_load(path.read_text()) or {}
    if set(raw) - {"models"}:
        raise ConfigError(sorted(set(raw) - {"models"})[0], "unknown top-level key", allowed=["models"], source=str(path))
    return {name: parse_entry(name, entry, path.stem, str(path)) for name, entry in (raw.get("models") or {}).items()}


def parse_entry(name: str, entry: dict | None, model_set: str, source: str) -> ModelSpec:
    """One registry entry validated (the one-line :class:`ConfigError` names ``models.<name>.<key>``):
    its fields here, its placement options (``backend``, ``tp``, ``device_map``) by its backend
    (:meth:`bayesflip.backends.base.Backend.validate_spec`)."""
    try:
        spec = ModelSpec(name=name, model_set=model_set, **(entry or {}))
    except ValidationError as err:
        key, msg, allowed = _format_validation(err)
        raise ConfigError(f"models.{name}.{key}", msg, allowed=allowed, source=source) from None
    except TypeError as err:
        raise ConfigError(f"models.{name}", str(err), source=source) from None
    try:
        validate_spec(spec)
    except ConfigError as err:
        raise ConfigError(err.key, err.message, allowed=err.allowed, source=source) from None
    return spec


def load_registry(config_dir: Path | None = None) -> dict[str, ModelSpec]:
    """All models of all sets (of ``config_dir``, default :func:`configs_dir`). A name defined in
    two sets is an error."""
    return _load_registry(configs_dir(config_dir))


def forget_registry() -> None:
    """Drop the cached registries (after a models file was written)."""
    _load_registry.cache_clear()


@lru_cache(maxsize=4)
def _load_registry(config_dir: Path) -> dict[str, ModelSpec]:
    reg: dict[str, ModelSpec] = {}
    for path in sorted((config_dir / "models").glob("*.yaml")):
        for name, spec in parse_model_file(path).items():
            if name in reg:
                raise ConfigError(f"models.{name}", f"defined twice ({reg[name].model_set}.yaml and {path.name})")
            reg[name] = spec
    return reg


def model_sets(config_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (configs_dir(config_dir) / "models").glob("*.yaml"))


def get_model_spec(name: str, config_dir: Path | None = None) -> ModelSpec:
    reg = load_registry(config_dir)
    if name not in reg:
        raise UnknownModelError(name, reg)
    return reg[name]


def models_of_type(model_type: str, config_dir: Path | None = None) -> list[ModelSpec]:
    """Models selected by ``MODEL_TYPE``: a set name (file stem), a model name, ``all``, ``std``,
    ``instruct``, or ``<set>:<std|instruct|all>`` (e.g. ``paper:std``: the base models of one set)."""
    reg = load_registry(config_dir)
    sets = model_sets(config_dir)
    if ":" in model_type:
        set_name, kind = model_type.split(":", 1)
        if set_name not in sets or kind not in ("std", "instruct", "all"):
            raise ConfigError("MODEL_TYPE", f"unknown model type {model_type!r}",
                              allowed=[f"{s}:{k}" for s in sets for k in ("std", "instruct", "all")])
        return [m for m in reg.values() if m.model_set == set_name and kind in ("all", m.kind)]
    if model_type == "all":
        return list(reg.values())
    if model_type in ("std", "instruct"):
        # base / chat models of the cluster sets (the offline local set is separate)
        return [m for m in reg.values() if m.kind == model_type and m.model_set not in ("local", "extra")]
    if model_type in sets:
        return [m for m in reg.values() if m.model_set == model_type]
    if model_type in reg:
        return [reg[model_type]]
    raise ConfigError("MODEL_TYPE", f"unknown model type {model_type!r}", allowed=["all", "std", "instruct", *sets, "<set>:<std|instruct|all>", "<a model name>"])
