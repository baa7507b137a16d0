"""Stimuli are data: every list or text a family reads accepts an inline value or ``file:<path>``.

* list parameters (query paraphrases, instruct prompts, needle statements, ...):
  an inline YAML list, or ``file:<path>`` — a ``.txt`` file with one entry per line (only the
  line break is removed, so a query that ends in a space keeps it; blank lines and lines
  starting with ``#`` are skipped), or a ``.yaml``/``.yml``/``.json`` file holding a list of strings.
  ``set:<name>`` names one of bayesflip's shipped sets (``configs/prompts/<name>.txt``).
* text parameters (a story, a filler text): an inline string, or ``file:<path>`` (the whole file).

Relative paths resolve against the current directory, then the configs directory. Values are
resolved when params are validated, so the stored config and its hash hold the texts themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Union

import yaml
from pydantic import BeforeValidator

from .paths import configs_dir


def _resolve_path(spec: str) -> Path:
    raw = Path(spec).expanduser()
    for cand in ([raw] if raw.is_absolute() else [Path.cwd() / raw, configs_dir() / raw]):
        if cand.is_file():
            return cand
    raise ValueError(f"stimulus file {spec!r} not found (relative paths: current directory or {configs_dir()})")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"stimulus file {path} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"stimulus file {path} cannot be read ({e.strerror})") from None


def read_lines(text: str) -> list[str]:
    """One entry per line; only the line break goes (trailing spaces are data); blanks and ``#`` lines skipped."""
    out = []
    for ln in text.split("\n"):
        ln = ln[:-1] if ln.endswith("\r") else ln
        if ln.strip() and not ln.lstrip().startswith("#"):
            out.append(ln)
    return out


def load_list(value: Union[str, list, tuple]) -> list[str]:
    """An inline list, ``file:<path>`` (.txt lines / YAML or JSON list) or ``set:<name>`` → list of strings."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str) and value.startswith("set:"):
        name = value[4:]
        path = configs_dir() / "prompts" / f"{name}.txt"
        if not path.is_file():
            sets = sorted(p.stem for p in (configs_dir() / "prompts").glob("*.txt"))
            raise ValueError(f"unknown stimulus set {name!r} (allowed: {', '.join('set:' + s for s in sets)})")
        items = read_lines(_read(path))
    elif isinstance(value, str) and value.startswith("file:"):
        path = _resolve_path(value[5:])
        text = _read(path)
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            try:
                items = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
            except (yaml.YAMLError, json.JSONDecodeError) as e:
                raise ValueError(f"stimulus file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
            if not isinstance(items, list):
                raise ValueError(f"stimulus file {path} must hold a list of strings, not {type(items).__name__}")
        else:
            items = read_lines(text)
    else:
        raise ValueError("expected a list of strings, 'file:<path>' or 'set:<name>'")
    bad = [x for x in items if not isinstance(x, str) or not x.strip()]
    if bad:
        raise ValueError(f"every entry must be a non-empty string (got {bad[0]!r})")
    if not items:
        raise ValueError("the list is empty")
    return items


def load_text(value: str) -> str:
    """An inline string or ``file:<path>`` (the whole file) → the text."""
    if not isinstance(value, str):
        raise ValueError("expected a string or 'file:<path>'")
    if value.startswith("file:"):
        return _read(_resolve_path(value[5:]))
    return value


StimulusList = Annotated[list[str], BeforeValidator(load_list)]
"""A params field type: inline list, ``file:<path>`` or ``set:<name>``, resolved at validation."""

StimulusText = Annotated[str, BeforeValidator(load_text)]
"""A params field type: inline text or ``file:<path>``, resolved at validation."""
