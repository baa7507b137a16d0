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
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError
from .paths import configs_dir

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


def _json_types(node: dict, defs: dict) -> tuple[set[str], list[dict]]:
    """(JSON types a schema node allows, its alternative nodes) — $ref and anyOf/oneOf resolved."""
    if "$ref" in node:
        node = defs.get(node["$ref"].split("/")[-1], {})
    alts = node.get("anyOf") or node.get("oneOf")
    if alts:
        types: set[str] = set()
        nodes: list[dict] = []
        for a in alts:
            t, n = _json_types(a, defs)
            types |= t
            nodes += n
        return types, nodes
    ty = node.get("type")
    types = set(ty) if isinstance(ty, list) else ({ty} if ty else set())
    for v in node.get("enum", []) + ([node["const"]] if "const" in node else []):
        types.add({bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(v), "other"))
    return types, [node]


def strict_type_error(schema: dict, value, loc: tuple = ()) -> tuple[tuple, str] | None:
    """Where pydantic's lax mode would coerce YAML ``true`` or ``"3"`` into a number: (loc, message)."""
    defs = schema.get("$defs", {})

    def walk(node: dict, v, where: tuple):
        types, nodes = _json_types(node, defs)
        if not types:
            return None
        if isinstance(v, bool):
            if "boolean" not in types and types & {"integer", "number"}:
                return where, f"expected a number, got a boolean ({v!r})"
            return None
        if isinstance(v, str) and "string" not in types and types & {"integer", "number", "boolean"}:
            return where, f"expected a {'number' if types & {'integer', 'number'} else 'boolean'}, got a string ({v!r})"
        if isinstance(v, list):
            for n in nodes:
                if n.get("type") == "array":
                    pre = n.get("prefixItems") or []
                    for i, x in enumerate(v):
                        sub = pre[i] if i < len(pre) else n.get("items")
                        if isinstance(sub, dict):
                            r = walk(sub, x, where + (i,))
                            if r:
                                return r
                    break
        if isinstance(v, dict):
            for n in nodes:
                props = n.get("properties")
                if props is not None or isinstance(n.get("additionalProperties"), dict):
                    for k, x in v.items():
                        sub = (props or {}).get(k, n.get("additionalProperties"))
                        if isinstance(sub, dict):
                            r = walk(sub, x, where + (k,))
                            if r:
                                return r
                    break
        return None

    return walk(schema, value, loc)


def validate_params(model_cls: type[BaseModel], raw: dict, prefix: str, source: str | None = None) -> BaseModel:
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(prefix, f"must be a mapping of parameter names to values (got a {_kind(raw)})",
                          source=source)
    try:
        schema = model_cls.model_json_schema()
    except Exception as schema_err:  # a schema that cannot be rendered only costs the strict/range checks
        schema = {"error": str(schema_err)}
    bad = strict_type_error(schema, raw or {})
    if bad:
        raise ConfigError(".".join(str(x) for x in (prefix, *bad[0]) if x != ""), bad[1], source=source)
    try:
        return model_cls(**(raw or {}))
    except ValidationError as err:
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


def _kind(v) -> str:
    return {list: "list", dict: "mapping", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml's parser where PyYAML was built with it


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[valid-type,misc]  # a base chosen at import
    """SafeLoader that rejects a key given twice in one mapping (YAML would silently keep the last)."""


def _construct_unique_mapping(loader, node, deep=False):
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        except TypeError:   # unhashable key: the base constructor reports it
            pass
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(path: Path):
    """A YAML file → Python data; unreadable files, non-UTF-8 bytes, syntax errors and duplicate keys
    are one-line :class:`ConfigError` naming the file (and line)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = Path(path).read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError("<file>", f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}, "
                          f"line {line})", source=str(path)) from None
    except OSError as e:
        raise ConfigError("<file>", f"cannot read: {e.strerror or e}", source=str(path)) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e)
        key = "<file>"
        m = re.match(r"duplicate key (.+?) \(", str(what))
        if m:
            key = m.group(1).strip("'\"")
        raise ConfigError(key, f"invalid YAML: {' '.join(str(what).split())}{where}", source=str(path)) from None


def read_yaml_mapping(path: Path) -> dict:
    data = load_yaml(path)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"must be a mapping (got a {_kind(data)})", source=str(path))
    return data


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def check_name(name, key: str, source: str | None = None) -> str:
    """Sweep / experiment / model names become directory names: plain names only (no '/', '..', absolute)."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ConfigError(key, f"{name!r} is not a plain name (letters, digits, '_', '-', '.', '+'; no path "
                          f"separators, '..' or absolute paths)", source=source)
    return name


def _int_key(raw: dict, key: str, default: int, lo: int, prefix: str, src: str) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        what = "a non-negative" if lo == 0 else "a positive"
        raise ConfigError(prefix + key, f"must be {what} integer (got {_kind(v)} {v!r})", source=src)
    return v


MAX_CELLS = 10_000_000           # cells of one experiment (the planner holds every cell dict: ~0.5 kB each)
MAX_SHARD_BYTES = 2 * 1024 ** 3  # one shard's arrays, uncompressed (a job holds a shard; set_verified reads it)
_DTYPE_BYTES = {"float64": 8, "int64": 8, "str": 64, "bool": 1}


def check_grid_size(fam, params, shard_size: int, prefix: str = "", src: str | None = None) -> int:
    """Refuse a grid or a shard too large to hold, before any cell is built; return the cell estimate.

    Cells: :meth:`Family.cell_estimate` (an upper bound) ≤ :data:`MAX_CELLS`. Shard:
    ``shard_size × Σ_arrays ∏shape·bytes(dtype)`` ≤ :data:`MAX_SHARD_BYTES` (a ``str`` cell counted as 64 B)."""
    est = fam.cell_estimate(params)
    if est > MAX_CELLS:
        reps = ", ".join(f"{k}={getattr(params, k)}" for k in fam.repeat_params if getattr(params, k, None))
        raise ConfigError(prefix + "params", f"grid of ~{est:,} cells is over the limit of {MAX_CELLS:,} cells per "
                          f"experiment ({reps or 'the lists of the grid'}); use a coarser grid or split the "
                          "experiment", source=src)
    per_cell = sum(math.prod(a.shape or (1,)) * _DTYPE_BYTES.get(a.dtype, 4) for a in fam.arrays(params).values())
    if shard_size > MAX_CELLS or shard_size * per_cell > MAX_SHARD_BYTES:
        most = max(1, min(MAX_CELLS, MAX_SHARD_BYTES // max(per_cell, 1)))
        raise ConfigError(prefix + "shard_size", f"{shard_size:,} cells per shard is too large (a shard's arrays "
                          f"take {shard_size * per_cell / 1024 ** 3:,.1f} GiB uncompressed)",
                          allowed=[f"[1, {most:,}]"], source=src)
    return est


def experiment_names(config_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (configs_dir(config_dir) / "experiments").glob("*.yaml"))


def sweep_names(config_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (configs_dir(config_dir) / "sweeps").glob("*.yaml"))


def load_experiment(name: str, overrides: dict | None = None, config_dir: Path | None = None,
                    prefix: str = "", override_source: str | None = None) -> ExperimentConfig:
    from .experiments import get_family, family_names

    check_name(name, prefix + "experiment" if prefix else "--exp")
    path = configs_dir(config_dir) / "experiments" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(prefix + "experiment", f"unknown experiment {name!r}", allowed=experiment_names(config_dir))
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(prefix.rstrip(".") or "overrides", f"must be a mapping of overrides (got a {_kind(overrides)})")
    raw = deep_merge(read_yaml_mapping(path), overrides or {})
    src = str(path) + ((f" + overrides in {override_source}" if override_source else " (+ sweep overrides)")
                       if overrides else "")
    for k in raw:
        if k not in TOP_KEYS:
            raise ConfigError(prefix + k, "unknown key", allowed=sorted(TOP_KEYS), source=src)
    fam_name = raw.get("family")
    if fam_name not in family_names():
        raise ConfigError(prefix + "family", f"unknown family {fam_name!r}", allowed=family_names(), source=src)
    seed = _int_key(raw, "seed", 0, 0, prefix, src)
    shard = _int_key(raw, "shard_size", 16, 1, prefix, src)
    fam = get_family(fam_name)
    params = validate_params(fam.Params, raw.get("params") or {}, prefix + "params", src)
    check_grid_size(fam, params, shard, prefix, src)
    resolved = {"family": fam_name, "seed": seed, "shard_size": shard, "params": params.model_dump(mode="json")}
    return ExperimentConfig(name=name, family=fam_name, seed=seed, shard_size=shard, params=params, raw=resolved)


@dataclass
class SweepConfig:
    name: str
    models: list[str]
    experiments: list[ExperimentConfig]
    array_throttle: int | None = None


def load_sweep(name: str, model_type: str | None = None, config_dir: Path | None = None) -> SweepConfig:
    """A sweep by name, or a single experiment name (a sweep of one, named after it)."""
    check_name(name, "--exp/--sweep")
    path = configs_dir(config_dir) / "sweeps" / f"{name}.yaml"
    if path.exists():
        raw = read_yaml_mapping(path)
        for k in raw:
            if k not in SWEEP_KEYS:
                raise ConfigError(k, "unknown key", allowed=sorted(SWEEP_KEYS), source=str(path))
        exps_raw = raw.get("experiments") or {}
        if not isinstance(exps_raw, dict):
            raise ConfigError("experiments", f"must be a mapping of experiment name → overrides (got a "
                              f"{_kind(exps_raw)}; write `experiments: {{name: {{}}}}`)", source=str(path))
        if not exps_raw:
            raise ConfigError("experiments", "empty grid: the sweep lists no experiments", source=str(path))
        exps = []
        for e, ov in exps_raw.items():
            check_name(e, f"experiments.{e}", str(path))
            if ov is not None and not isinstance(ov, dict):
                raise ConfigError(f"experiments.{e}", f"must be a mapping of overrides (got a {_kind(ov)})",
                                  source=str(path))
            exps.append(load_experiment(e, ov or {}, config_dir, prefix=f"experiments.{e}.", override_source=str(path)))
        models_raw = _models_raw(raw, model_type, path)
        throttle = raw.get("array_throttle")
        if throttle is not None and (isinstance(throttle, bool) or not isinstance(throttle, int) or throttle < 1):
            raise ConfigError("array_throttle", f"must be a positive integer (got {_kind(throttle)} {throttle!r})",
                              source=str(path))
    elif (configs_dir(config_dir) / "experiments" / f"{name}.yaml").exists():
        exps = [load_experiment(name, None, config_dir)]
        models_raw = model_type or DEFAULT_MODEL
        throttle = None
    else:
        raise ConfigError("EXP", f"unknown experiment or sweep {name!r}",
                          allowed=sweep_names(config_dir) + experiment_names(config_dir))
    return SweepConfig(name=name, models=_resolve_models(models_raw, config_dir), experiments=exps,
                       array_throttle=throttle)


def _models_raw(raw: dict, model_type: str | None, path: Path):
    models_raw = model_type or raw.get("models") or DEFAULT_MODEL
    if not isinstance(models_raw, str) and not (isinstance(models_raw, list)
                                                and all(isinstance(m, str) for m in models_raw)):
        raise ConfigError("models", f"must be a MODEL_TYPE string or a list of model names (got "
                          f"{_kind(models_raw)} {models_raw!r})", source=str(path))
    return models_raw


def _resolve_models(models_raw, config_dir: Path | None) -> list[str]:
    from .models.registry import get_model_spec, models_of_type

    if isinstance(models_raw, str):
        models = [m.name for m in models_of_type(models_raw, config_dir)]
    else:
        models = [get_model_spec(m, config_dir).name for m in models_raw]
    if not models:
        raise ConfigError("models", f"no models selected by {models_raw!r}")
    return models


def sweep_models(name: str, model_type: str | None = None, config_dir: Path | None = None) -> list[str]:
    """The models :func:`load_sweep` would select, without loading the experiments (cheap: commands
    check that the models are prepared before anything heavy is imported). A name that is neither
    a sweep nor an experiment is left to :func:`load_sweep`'s error (returns ``[]``)."""
    check_name(name, "--exp/--sweep")
    path = configs_dir(config_dir) / "sweeps" / f"{name}.yaml"
    if path.exists():
        return _resolve_models(_models_raw(read_yaml_mapping(path), model_type, path), config_dir)
    if (configs_dir(config_dir) / "experiments" / f"{name}.yaml").exists():
        return _resolve_models(model_type or DEFAULT_MODEL, config_dir)
    return []
