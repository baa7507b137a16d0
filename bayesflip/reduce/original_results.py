"""Readers of the coin-flip study's stored result files (a checkout of ``rcorona/llm-coin-flips``).

The original repository keeps its results under ``exps/`` in three forms; this module reads each
into plain Python / numpy values and computes nothing beyond what a reader needs:

* ``averaged_stats.txt`` — an indented text dump of ``average_stats`` (the original's mean and
  ``np.std`` over prompts): section lines (``unconditional_point``, ``biased_point``, then one line
  per statement) and metric lines ``name: <mean> +/- <std>`` whose values are numbers or numpy array
  reprs (long arrays wrap onto continuation lines). :func:`parse_averaged_stats` returns nested dicts
  whose leaves are ``{"mean": value, "std": value}`` (floats or float arrays).
* ``stats.pkl`` — pickled dicts of numpy arrays (needle pivot tables, chain-of-thought runs,
  Poisson λ̂ lists). :func:`read_pickle` loads one; **unpickling runs code from the file**, so only
  point these readers at a checkout you trust.
* notebook outputs — :func:`notebook_output` returns the printed (stream) text of one cell of an
  ``.ipynb`` file; :func:`parse_printed_values` reads ``name: [x]`` lines from it.

Statements are identified by the numbers in them, never by their wording: :func:`stated_percent`
(the ``b`` of "… b% …"), :func:`stated_face` (the die face before the percentage).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np

from ..errors import BayesflipError

_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf", re.IGNORECASE)
_METRIC = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*): (.*)$")


class OriginalResultError(BayesflipError):
    """A stored result of the original repository is missing or cannot be read as expected."""


def _value(text: str):
    """A number, or a (nested) numpy array repr as a flat float array."""
    nested = "[" in text
    nums = [float(x) for x in _NUM.findall(text.replace("[", " ").replace("]", " "))]
    if not nested:
        if len(nums) != 1:
            raise OriginalResultError(f"cannot read a number from {text!r}")
        return nums[0]
    return np.asarray(nums, dtype=float)   # nested arrays ([[...]]) are returned flat


def parse_averaged_stats(text: str) -> dict:
    """``averaged_stats.txt`` → nested dict; leaves ``{"mean": v, "std": v}`` (``all_seq_probs`` flattened)."""
    # join continuation lines of wrapped arrays (a line is complete when its brackets balance)
    lines: list[str] = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        if lines and lines[-1].count("[") > lines[-1].count("]"):
            lines[-1] += " " + raw.strip()
        else:
            lines.append(raw.rstrip())
    root: dict = {}
    stack: list[tuple[int, dict]] = [(-1, root)]
    for line in lines:
        indent = len(line) - len(line.lstrip(" "))
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        m = _METRIC.match(line)
        if m and " +/- " in m.group(3):
            mean, std = m.group(3).split(" +/- ", 1)
            parent[m.group(2)] = {"mean": _value(mean), "std": _value(std)}
        else:
            node: dict = {}
            parent[line.strip()] = node
            stack.append((indent, node))
    return root


def read_averaged_stats(path: Path) -> dict:
    if not path.is_file():
        raise OriginalResultError(f"missing stored result {path}")
    return parse_averaged_stats(path.read_text())


def read_pickle(path: Path):
    """A stored ``.pkl`` of the original (numpy values). Unpickling runs code: use trusted checkouts only."""
    if not path.is_file():
        raise OriginalResultError(f"missing stored result {path}")
    with path.open("rb") as f:
        return pickle.load(f)  # noqa: S301 — the original repository's own result files


def notebook_output(path: Path, cell: int) -> str:
    """The printed (stream) output of code cell index ``cell`` (0-based over all cells) of a notebook."""
    if not path.is_file():
        raise OriginalResultError(f"missing notebook {path}")
    cells = json.loads(path.read_text())["cells"]
    if cell >= len(cells):
        raise OriginalResultError(f"{path} has {len(cells)} cells, no cell {cell}")
    outs = cells[cell].get("outputs", [])
    return "".join("".join(o.get("text", [])) for o in outs if o.get("output_type") == "stream")


def parse_printed_values(text: str) -> dict[str, float]:
    """``name: [x]`` / ``name: x`` lines (as printed by the original notebooks) → {name: x}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([\w.\-/]+): \[?\s*([-+0-9.eE]+)\s*\]?\s*$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def stated_percent(statement: str) -> int:
    """The percentage ``b`` stated in a bias statement ("… heads 30% …", "… on 4 60% …")."""
    m = re.findall(r"(\d+)%", statement)
    if len(m) < 1:
        raise OriginalResultError(f"no percentage in the statement key {statement[:60]!r}")
    return int(m[0])


def stated_face(statement: str) -> int:
    """The die face named right before the stated percentage ("… on 4 60% …" → 4)."""
    m = re.search(r"\b([1-6]) \d+%", statement)
    if not m:
        raise OriginalResultError(f"no die face in the statement key {statement[:60]!r}")
    return int(m.group(1))
