"""Experiment and sweep configs (YAML) → validated, resolved specs.

``configs/experiments/<name>.yaml``::

    family: icl            # a registered experiment family (plug-in)
    seed: 1234
    shard_size: 16         # cells per shard = per Zarr chunk = unit of resume
    params: {...}          # the family's own parameters (validated, unknown keys rejected)

``configs/sweeps/<name>.yaml``::

    models: [smollm2-135m-instruct]     # or a MODEL_TYPE string (std, instruct, local, all)
    experiments:
      icl_coin: {params: {n_flips: 20}} # overrides deep-merged onto the experiment's config
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError
from .paths import CONFIG_DIR

TOP_KEYS = {"family", "seed", "shard_size", "params", "description"}
DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded offline model
SWEEP_KEYS = {"models", "experiments", "description", "array_throttle"}


def _schema_range(schema: dict | None, loc: tuple) -> str | None:
    """The full allowed range of the field at ``loc`` from a pydantic JSON schema ("[0, 1]")."""
    if not schema:
        return None
    defs = schema.get("$defs", {})
    node: dict = schema
    for part in loc:
        if "$ref" in node:
            node = defs.get(node["$ref"].split("/")[-1], {})
        if isinstance(part, int):
            node = node.get("items", node.get("prefixItems", [{}])[0] if "prefixItems" in node else {})
        else:
            node = node.get("properties", {}).get(part, {})
        for alt in node.get("anyOf", []):
            if alt.get("type") != "null":
                node = alt
                break
    lo = node.get("minimum", node.get("exclusiveMinimum"))
    hi = node.get("maximum", node.get("exclusiveMaximum"))
    if lo is None and hi is None:
        return None
    left = "[" if "minimum" in node else "("
    right = "]" if "maximum" in node else ")"
    return f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"


def pydantic_error(err: ValidationError, prefix: str, source: str | None = None,
                   schema: dict | None = None) -> ConfigError:
    """First validation error → ConfigError naming the dotted key and the allowed values."""
    e = err.errors()[0]
    key = ".".join(str(x) for x in (prefix, *e["loc"]) if x != "")
    ctx = e.get("ctx") or {}
    allowed = None
    if "expected" in ctx:
        allowed = [ctx["expected"]]
    elif any(k in ctx for k in ("ge", "le", "gt", "lt")) and _schema_range(schema, tuple(e["loc"])):
        allowed = [_schema_range(schema, tuple(e["loc"]))]
    elif any(k in ctx for k in ("ge", "le", "gt", "lt")):
        lo = ctx.get("ge", ctx.get("gt", "-inf"))
        hi = ctx.get("le", ctx.get("lt", "inf"))
        allowed = [f"{'[' if 'ge' in ctx else '('}{lo}, {hi}{']' if 'le' in ctx else ')'}"]
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    return ConfigError(key, f"{msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden" else msg,
                       allowed=allowed, source=source)


def validate_params(model_cls: type[BaseModel], raw: dict, prefix: str, source: str | None = None) -> BaseModel:
    try:
        return model_cls(**(raw or {}))
    except ValidationError as err:
        try:
            schema = model_cls.model_json_schema()
        except Exception as schema_err:  # a schema that cannot be rendered only costs the range hint
            schema = {"error": str(schema_err)}
        exc = pydantic_error(err, prefix, source, schema)
        if "unknown key" in str(exc):
            exc = ConfigError(exc.key, "unknown key", allowed=sorted(model_cls.model_fields), source=source)
        raise exc from None


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ExperimentConfig:
    name: str
    family: str
    seed: int
    shard_size: int
    params: BaseModel
    raw: dict   # the resolved config (after overrides), as stored in provenance

    @property
    def hash(self) -> str:
        return config_hash(self.raw)


def read_yaml_mapping(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("<file>", f"invalid YAML: {e}", source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("<root>", "must be a mapping", source=str(path))
    return data


def experiment_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir) / "experiments").glob("*.yaml"))


def sweep_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir) / "sweeps").glob("*.yaml"))


def load_experiment(name: str, overrides: dict | None = None, config_dir: Path = CONFIG_DIR,
                    prefix: str = "") -> ExperimentConfig:
    from .experiments import get_family, family_names

    path = Path(config_dir) / "experiments" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(prefix + "experiment", f"unknown experiment {name!r}", allowed=experiment_names(config_dir))
    raw = deep_merge(read_yaml_mapping(path), overrides or {})
    src = str(path) + (" (+ sweep overrides)" if overrides else "")
    for k in raw:
        if k not in TOP_KEYS:
            raise ConfigError(prefix + k, "unknown key", allowed=sorted(TOP_KEYS), source=src)
    fam_name = raw.get("family")
    if fam_name not in family_names():
        raise ConfigError(prefix + "family", f"unknown family {fam_name!r}", allowed=family_names(), source=src)
    seed = raw.get("seed", 0)
    shard = raw.get("shard_size", 16)
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(prefix + "seed", f"must be a non-negative integer (got {seed!r})", source=src)
    if not isinstance(shard, int) or shard < 1:
        raise ConfigError(prefix + "shard_size", f"must be a positive integer (got {shard!r})", source=src)
    fam = get_family(fam_name)
    params = validate_params(fam.Params, raw.get("params") or {}, prefix + "params", src)
    resolved = {"family": fam_name, "seed": seed, "shard_size": shard, "params": params.model_dump(mode="json")}
    return ExperimentConfig(name=name, family=fam_name, seed=seed, shard_size=shard, params=params, raw=resolved)


@dataclass
class SweepConfig:
    name: str
    models: list[str]
    experiments: list[ExperimentConfig]
    array_throttle: int | None = None


def load_sweep(name: str, model_type: str | None = None, config_dir: Path = CONFIG_DIR) -> SweepConfig:
    """A sweep by name, or a single experiment name (a sweep of one, named after it)."""
    from .models.registry import models_of_type

    path = Path(config_dir) / "sweeps" / f"{name}.yaml"
    if path.exists():
        raw = read_yaml_mapping(path)
        for k in raw:
            if k not in SWEEP_KEYS:
                raise ConfigError(k, "unknown key", allowed=sorted(SWEEP_KEYS), source=str(path))
        exps_raw = raw.get("experiments") or {}
        if not exps_raw:
            raise ConfigError("experiments", "empty grid: the sweep lists no experiments", source=str(path))
        exps = [load_experiment(e, ov or {}, config_dir, prefix=f"experiments.{e}.") for e, ov in exps_raw.items()]
        models_raw = model_type or raw.get("models") or DEFAULT_MODEL
        throttle = raw.get("array_throttle")
    elif (Path(config_dir) / "experiments" / f"{name}.yaml").exists():
        exps = [load_experiment(name, None, config_dir)]
        models_raw = model_type or DEFAULT_MODEL
        throttle = None
    else:
        raise ConfigError("EXP", f"unknown experiment or sweep {name!r}",
                          allowed=sweep_names(config_dir) + experiment_names(config_dir))
    if isinstance(models_raw, str):
        models = [m.name for m in models_of_type(models_raw, config_dir)]
    else:
        from .models.registry import get_model_spec
        models = [get_model_spec(m, config_dir).name for m in models_raw]
    if not models:
        raise ConfigError("models", f"no models selected by {models_raw!r}")
    return SweepConfig(name=name, models=models, experiments=exps, array_throttle=throttle)
