"""``bayesflip models add <hub-id | directory>``: a registry entry written from the model's own files.

Contract:

* **Where it writes**: one entry appended to ``configs/models/<set>.yaml`` (``--set``, default
  ``user``; the file is created with a header when missing; existing text and comments are kept).
  The entry is validated exactly as registry loading validates it
  (:func:`~bayesflip.models.registry.parse_entry`), the new file is re-read and the whole registry
  loaded before the file is replaced (atomically). A name already in the registry, or a Hub id
  already registered when no ``--name`` is given, is refused with one line and nothing is written.
* **What it reads — never the network by default**: a local directory (``source: local``), or the
  Hub-cache snapshot of ``id@revision`` (there after ``bayesflip models prepare``, or any earlier
  download into ``HF_HOME``). ``--hub`` reads the small files (``config.json``,
  ``tokenizer_config.json``, the chat template, the safetensors index: a few kB, no weights) from the
  Hub into a temporary directory that is deleted afterwards; the Hub cache is left alone, so the
  model does not look prepared. Without files (an uncached model, no ``--hub``) the entry is
  written from the flags alone: ``--kind`` is then required, and ``params_b`` stays unset (the
  cost planner times such a model at its template's reference size and says so) unless
  ``--params-b`` is given.
* **What it fills** (flags win): ``params_b`` — parameters counted on a meta-device instance of the
  config (no memory, no weights; tied embeddings once), else from the safetensors headers, else the
  index's ``total_size`` ÷ bytes per parameter; ``dtype`` — the config's ``torch_dtype``/``dtype``
  (float32 | bfloat16 | float16, else bfloat16); ``max_length`` — the config's context window;
  ``kind`` — :func:`infer_kind`; ``attn_implementation: eager`` for Gemma-2 (logit soft-capping);
  ``tp`` > 1 — ``backend: deepspeed`` and a GPU job template with ``tp`` tasks (one per TP rank),
  else ``gpu-small``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from ..errors import BayesflipError, ConfigError
from ..paths import configs_dir
from .registry import ModelSpec, forget_registry, load_registry, model_sets, parse_entry

DEFAULT_SET = "user"
RESERVED = ("all", "std", "instruct")          # MODEL_TYPE words: never a set or model name
KINDS = {"base": "std", "std": "std", "instruct": "instruct"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# small files that describe a model (``--hub`` reads these; weights never)
HUB_FILES = ("config.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
             "model.safetensors.index.json")
INSTRUCT_HINT = re.compile(r"(instruct|chat|(^|[-_.])it($|[-_.])|sft|dpo|rlhf)", re.IGNORECASE)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HEADER = ("# Models added with `bayesflip models add` (one entry each; edit freely, the registry\n"
          "# validates this file like every other under configs/models/).\n")


class ModelAddError(BayesflipError, ValueError):
    """``models add`` cannot write an entry (the message says what to pass)."""


@dataclass
class ModelFacts:
    """What the model's own files say (None: not known)."""

    where: str                                  # where the files were read: a directory, or "nowhere"
    params: Optional[int] = None
    params_how: str = ""
    dtype: Optional[str] = None
    context: Optional[int] = None
    chat_template: Optional[bool] = None
    model_type: Optional[str] = None
    notes: list[str] = field(default_factory=list)


def default_name(model: str) -> str:
    """``Qwen/Qwen2.5-0.5B`` → ``qwen2.5-0.5b`` (the last path component, lower case)."""
    return Path(model.rstrip("/")).name.lower()


def infer_kind(model: str, chat_template: Optional[bool]) -> tuple[Optional[str], str]:
    """(kind, why). No chat template → ``std``. A chat template *and* a name that says so (instruct,
    chat, -it, sft, dpo, rlhf) → ``instruct``. A chat template alone is not enough: base models ship
    one too (Qwen2.5, Llama-3.1, Mistral-v0.3 base), so such a model is ``std`` and the note says
    to pass ``--kind instruct`` if it is a chat model. Unknown files → (None, why)."""
    hint = bool(INSTRUCT_HINT.search(Path(model.rstrip("/")).name))
    if chat_template is None:
        return None, "no files to read the chat template from"
    if not chat_template:
        return "std", "no chat template"
    if hint:
        return "instruct", "chat template, and its name says instruct/chat"
    return "std", ("it has a chat template but its name does not say instruct/chat (base models ship one too): "
                   "registered as std; pass --kind instruct if it is a chat model")


# ---------------------------------------------------------------------- reading the files
def _read_json(path: Path) -> Optional[dict]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ModelAddError(f"{path}: unreadable ({e})") from None
    return doc if isinstance(doc, dict) else None


def _has_chat_template(d: Path) -> bool:
    tc = _read_json(d / "tokenizer_config.json") or {}
    return bool(tc.get("chat_template")) or (d / "chat_template.jinja").is_file() \
        or (d / "chat_template.json").is_file() or (d / "additional_chat_templates").is_dir()


def _count_meta(d: Path) -> tuple[Optional[int], str]:
    """Parameters of the architecture built on the meta device (no memory): Σ numel, tied weights once."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(d)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        return sum(p.numel() for p in model.parameters()), "counted on the config's architecture (meta device)"
    except Exception as e:  # noqa: BLE001 — remote code, an architecture transformers lacks: try the files
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _count_safetensors(d: Path) -> Optional[int]:
    """Σ numel over the tensors of the ``*.safetensors`` headers (the first 8 bytes give the header size)."""
    files = sorted(d.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n < 100_000_000:          # a header is kB..MB; anything else is not safetensors
                    raise ValueError(f"header size {n}")
                header = json.loads(fh.read(n))
            total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise ModelAddError(f"{f}: unreadable safetensors header ({type(e).__name__}); re-run "
                                f"`bayesflip models prepare`, or pass --params-b") from None
    return total


def read_facts(d: Path) -> ModelFacts:
    """Facts from a model directory (a snapshot or a local checkout)."""
    cfg = _read_json(d / "config.json")
    if cfg is None:
        raise ModelAddError(f"{d} has no config.json: not a transformers model directory")
    facts = ModelFacts(where=str(d), model_type=cfg.get("model_type"))
    sub = tc if isinstance(tc := cfg.get("text_config"), dict) else {}
    dt = cfg.get("torch_dtype") or cfg.get("dtype") or sub.get("torch_dtype") or sub.get("dtype")
    facts.dtype = dt if dt in DTYPE_BYTES else None
    if facts.dtype is None:
        facts.notes.append(f"config dtype {dt!r} is not float32/bfloat16/float16: registered as bfloat16")
    ctx = next((c.get(k) for c in (cfg, sub) for k in CONTEXT_KEYS if isinstance(c.get(k), int)), None)
    facts.context = ctx if ctx and ctx >= 8 else None
    facts.chat_template = _has_chat_template(d)
    n, how = _count_meta(d)
    if n is not None:
        facts.params, facts.params_how = n, how
        return facts
    why = how
    n = _count_safetensors(d)
    if n is not None:
        facts.params, facts.params_how = n, f"the safetensors headers (the config did not build: {why})"
        return facts
    index = _read_json(d / "model.safetensors.index.json") or {}
    size = (index.get("metadata") or {}).get("total_size")
    if isinstance(size, (int, float)) and size > 0:
        facts.params = int(size / DTYPE_BYTES[facts.dtype or "bfloat16"])
        facts.params_how = f"the safetensors index's total_size ÷ {DTYPE_BYTES[facts.dtype or 'bfloat16']} bytes"
    else:
        facts.notes.append(f"parameters not counted ({why}); pass --params-b for cost estimates")
    return facts


def cached_snapshot(hub_id: str, revision: str) -> Optional[Path]:
    """The Hub-cache snapshot of ``hub_id@revision`` if one is there (no network)."""
    from .prepare import hub_snapshot

    return hub_snapshot(ModelSpec(name="_add", id=hub_id, revision=revision, kind="std"))


def fetch_hub_files(hub_id: str, revision: str, into: Path, download: Optional[Callable] = None) -> Path:
    """``--hub``: the :data:`HUB_FILES` that exist, read from the Hub into ``into`` (not the Hub cache).
    ``config.json`` is required; another file the repository lacks (404) is skipped; any other failure
    (network, gated, offline) is one line."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if download is None:
        from huggingface_hub import hf_hub_download as download

        from .prepare import check_hub_reachable
        check_hub_reachable(ModelAddError, f"on this node add {hub_id} from flags (--kind base|instruct, "
                                           f"--params-b N) or from a local directory")
    assert download is not None   # given, or hf_hub_download above
    for fname in HUB_FILES:
        try:
            path = download(repo_id=hub_id, filename=fname, revision=revision, cache_dir=str(into / "cache"))
        except Exception as e:  # noqa: BLE001 — reported in one line below
            if fname != "config.json" and isinstance(e, EntryNotFoundError) \
                    and not isinstance(e, LocalEntryNotFoundError):
                continue
            gated = " (gated model: accept its licence on the Hub and set HF_TOKEN)" \
                if any(x in str(e) for x in ("401", "403", "gated")) else ""
            raise ModelAddError(f"cannot read {fname} of {hub_id}@{revision} from the Hub: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}{gated}") from None
        shutil.copy(path, into / fname)
    return into


# ---------------------------------------------------------------------- the entry
def _template_for(tp: int, template: Optional[str]) -> str:
    from ..hpc.templates import load_template, template_names

    if template is not None:
        t = load_template(template)
        if t.n_tasks != tp:
            raise ConfigError("--template", f"template {template} runs {t.n_tasks} task(s) per array task; "
                              f"tp={tp} needs {tp} (one per TP rank)")
        return template
    if tp == 1:
        return "gpu-small"
    fits = [n for n in template_names() if (t := load_template(n)).gpus_per_node and t.n_tasks == tp]
    if not fits:
        raise ConfigError("--tp", f"no GPU job template runs {tp} tasks (one per TP rank); add one to "
                          f"job_templates/ and pass --template", allowed=[1, *sorted({load_template(n).n_tasks
                                                                                     for n in template_names()})])
    return fits[0]


def build_entry(model: str, *, kind: Optional[str] = None, tp: int = 1, revision: str = "main",
                template: Optional[str] = None, dtype: Optional[str] = None, params_b: Optional[float] = None,
                hub: bool = False, download: Optional[Callable] = None) -> tuple[dict, ModelFacts]:
    """(registry entry without the name, what the files said). Reads no network unless ``hub``."""
    if kind is not None and kind not in KINDS:
        raise ConfigError("--kind", f"unknown kind {kind!r}", allowed=list(KINDS))
    local = Path(model).expanduser()
    is_dir = local.is_dir()
    if not is_dir and (model.startswith((".", "/", "~")) or not HUB_ID.match(model)):
        raise ModelAddError(f"{model!r} is neither a local model directory nor a Hub id (org/name)")
    tmp = None
    try:
        if is_dir:
            facts = read_facts(local)
        elif (snap := cached_snapshot(model, revision)) is not None:
            facts = read_facts(snap)
        elif hub:
            tmp = Path(tempfile.mkdtemp(prefix="bayesflip-add-"))
            facts = read_facts(fetch_hub_files(model, revision, tmp, download))
            facts.where = f"the Hub ({model}@{revision}; config files only)"
        else:
            facts = ModelFacts(where="nowhere")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if facts.where == "nowhere" and kind is None:
        from .prepare import hub_cache_dir

        raise ModelAddError(f"{model}@{revision} is not in the Hub cache {hub_cache_dir()} and `models add` reads "
                            f"nothing from the network by default: pass --kind base|instruct (and --params-b N for "
                            f"cost estimates), or --hub to read its config files from the Hub")
    auto_kind, why = infer_kind(model, facts.chat_template)
    k: Optional[str]
    if kind is not None:
        k = KINDS[kind]
        if k == "instruct" and facts.chat_template is False:
            raise ModelAddError(f"{model} has no chat template ({facts.where}), so it cannot be registered as "
                                f"instruct (instruct prompts are rendered with the chat template); use --kind base")
        if auto_kind is not None and k != auto_kind:
            facts.notes.append(f"kind {k} as given (the files suggest {auto_kind}: {why})")
    else:
        k = auto_kind
        if "pass --kind" in why:
            facts.notes.append(why)
    entry: dict = {"id": str(local.resolve()) if is_dir else model}
    if is_dir:
        entry["source"] = "local"
    elif revision != "main":
        entry["revision"] = revision
    entry["kind"] = k
    entry["dtype"] = dtype or facts.dtype or "bfloat16"
    if params_b is None and facts.params:
        params_b = float(f"{facts.params / 1e9:.3g}")
    if params_b is not None:
        entry["params_b"] = params_b
    if tp > 1:
        entry["backend"] = "deepspeed"
        entry["tp"] = tp
    entry["template"] = _template_for(tp, template)
    if facts.context:
        entry["max_length"] = facts.context
    if facts.model_type == "gemma2":
        entry["attn_implementation"] = "eager"
    return entry, facts


def _entry_text(name: str, entry: dict, facts: ModelFacts) -> str:
    when = _dt.date.today().isoformat()
    src = f"read from {facts.where}" if facts.where != "nowhere" else "from the command line only (files not read)"
    how = f"; params_b {facts.params_how}" if facts.params_how else ""
    body = yaml.safe_dump({name: entry}, sort_keys=False, default_flow_style=False, width=10**6)
    return f"  # bayesflip models add, {when}: {src}{how}\n" + "".join("  " + ln for ln in body.splitlines(True))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def add_model(model: str, *, name: Optional[str] = None, kind: Optional[str] = None, tp: int = 1,
              model_set: str = DEFAULT_SET, revision: str = "main", template: Optional[str] = None,
              dtype: Optional[str] = None, params_b: Optional[float] = None, hub: bool = False,
              config_dir: Path | None = None, download: Optional[Callable] = None) -> tuple[ModelSpec, Path, ModelFacts]:
    """Write the entry (see the module docstring); returns (the validated spec, the file, the facts)."""
    from ..config import check_name

    if tp < 1:
        raise ConfigError("--tp", f"must be a positive integer (got {tp})")
    check_name(model_set, "--set")
    if model_set in RESERVED:
        raise ConfigError("--set", f"{model_set!r} is a MODEL_TYPE word, not a set name", allowed=["user", "<a name>"])
    reg = load_registry(config_dir)
    sets = model_sets(config_dir)
    nm = check_name(name or default_name(model), "--name")
    if nm in reg:
        raise ModelAddError(f"model {nm!r} is already in the registry ({reg[nm].model_set}.yaml: {reg[nm].id}); "
                            f"pass --name to add it under another name")
    if nm in RESERVED or nm in sets or nm == model_set:
        raise ModelAddError(f"{nm!r} names a model set or a MODEL_TYPE word; pass --name with another name")
    if name is None:
        same = [s.name for s in reg.values() if s.id == model and s.revision == revision]
        if same:
            raise ModelAddError(f"{model}@{revision} is already registered as {', '.join(same)}; pass --name to add "
                                f"another entry for it (e.g. with another --tp or --dtype)")
    entry, facts = build_entry(model, kind=kind, tp=tp, revision=revision, template=template, dtype=dtype,
                               params_b=params_b, hub=hub, download=download)
    path = configs_dir(config_dir) / "models" / f"{model_set}.yaml"
    old = path.read_text() if path.exists() else HEADER + "models:\n"
    raw = yaml.safe_load(old) or {}
    models = dict(raw.get("models") or {})
    text = old.rstrip("\n") + "\n" + _entry_text(nm, entry, facts)
    if (yaml.safe_load(text) or {}).get("models") != {**models, nm: entry}:
        # not a block-style `models:` mapping at the end of the file: rewrite it (its comments are lost)
        text = HEADER + yaml.safe_dump({"models": {**models, nm: entry}}, sort_keys=False, width=10**6)
    # the validation registry loading does, on the file as it will be (a name in two sets was refused above)
    specs = {n: parse_entry(n, e, model_set, str(path)) for n, e in yaml.safe_load(text)["models"].items()}
    _atomic_write(path, text)
    forget_registry()
    return specs[nm], path, facts


def add_cli(args) -> int:
    """``bayesflip models add``: write the entry, print it and the next step."""
    from .prepare import is_prepared

    spec, path, facts = add_model(args.model, name=args.name, kind=args.kind, tp=args.tp, model_set=args.set,
                                  revision=args.revision, template=args.template, dtype=args.dtype,
                                  params_b=args.params_b, hub=args.hub)
    print(f"added {spec.name} to {path}"
          + (f" (read {facts.where})" if facts.where != "nowhere" else " (files not read: entry from the flags)"))
    fields = ["kind", "dtype", "params_b", "backend", "tp", "template", "max_length"]
    print("  " + ", ".join(f"{k}: {getattr(spec, k)}" for k in fields if getattr(spec, k) is not None))
    for note in facts.notes:
        print(f"  note: {note}")
    if not is_prepared(spec):
        print(f"next: bayesflip models prepare {spec.name}   (downloads the weights into the Hub cache)")
    else:
        print(f"next: bayesflip plan --exp paper_coinflips --model-type {spec.name} --dry-run")
    return 0
