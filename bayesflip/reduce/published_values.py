"""The published values of the two studies (``published.yaml``): loading, their sources, and a check.

``published.yaml`` (beside this module) holds numbers of the coin-flip study (Gupta et al. 2025,
``rcorona/llm-coin-flips``) read from the result files stored in its repository, and the
iterated-learning study's (Ren et al. 2024, ``Joshua-Ren/iICL``) qualitative claims. The report's
"Against the papers" section (:mod:`bayesflip.reduce.published`) and the findings read them through
:func:`load_published`.

**Contract of** :func:`load_published` — a dict with

* ``source`` (study, repository, commit, label), ``iicl_source``, ``models`` (published name → registry
  name), ``result_dirs`` (published name → the model's directory name under the original's ``exps/``),
  ``sources`` (the family-level source templates as written in the file);
* one list of rows per family key. Every row has ``model`` (registry name), ``published_name`` (the
  paper's name), its values, and ``source``: a dict with ``path`` (file(s) in the original
  repository; ``{N}``, ``{b}``, ``{f}`` mark the grid a value aggregates over), ``commit``, ``key``
  (what was read), ``aggregation`` (what bayesflip computed from it; "none" = the stored number,
  rounded), ``cite`` (one short string for a table column), ``precision`` (the largest difference
  between the row and a recomputation that still counts as equal), optional ``note`` (a caveat shown
  with the cite) and ``detail`` (longer background, not shown in tables).

Family keys (values are 3-decimal roundings of the stored numbers):

* ``prior`` — P(heads) with no evidence, ``mean``/``std`` over the query paraphrases;
  ``prior_die`` — the six face probabilities (``mean``, ``std`` lists);
* ``explicit_coin_tvd`` — statement alone (no filler), TVD to the stated θ per stated ``b`` %
  (``tvd``, ``std`` over paraphrases); ``explicit_die_tvd`` (b ∈ {60, 80}) and
  ``explicit_die_tvd_v2`` (b ∈ {0, 20, …, 100}) — the same, mean over the six faces;
* ``needle_coin`` / ``needle_die`` / ``needle_number`` — the needle heatmap: ``tvd[i][j]`` at
  ``lengths[i]`` × ``depths[j]`` (mean over needles of the TVD of the filler-sample mean), the
  filler-only ``no_needle`` per length and the query-alone ``no_context``, both against uniform;
* ``icl_coin_tvd`` — TVD to θ after N flips, mean over the 11 θ (``tvd`` by N);
  ``icl_coin_tvd_theta`` — the same per ``theta``; ``icl_die_tvd`` — per ``bias``, mean over faces
  (``incomplete``: N → number of faces stored where fewer than six; those N are left out of ``tvd``);
* ``gamma`` — the paper's γ; ``poisson`` — λ̂ per (``mode``, ``lam``) at ``temperature``:
  ``lambda_hat`` (mean over the stored per-sample λ̂), ``lambda_hat_median``, ``n_samples``,
  ``story_words`` and ``conditions`` (a sentence; "conditions ambiguous" where the repository does
  not establish them);
* ``cot_coin_tvd`` / ``cot_die_tvd`` — chain of thought, TVD to the stated distribution per ``b``
  for each ``variant`` (``none`` = the statement alone, same query, no reasoning);
* ``claims`` — the iterated-learning study's qualitative claims (``study``, ``claim``,
  ``direction``; no ``model``): that repository stores no result numbers;
* ``absent`` — what the studies report that has no number here, and why.

:func:`check_published` recomputes every row from a checkout of the original repository and returns
the mismatches; ``bayesflip published --check <checkout>`` is the command.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml

from .. import bayes
from ..errors import BayesflipError
from .original_results import (OriginalResultError, notebook_output, parse_printed_values, read_averaged_stats,
                               read_pickle, stated_face, stated_percent)

PUBLISHED_PATH = Path(__file__).with_name("published.yaml")
LEGACY_KEYS = ("prior", "icl_coin_tvd", "icl_die_tvd", "gamma", "poisson")
MODEL_KEYS = LEGACY_KEYS + ("prior_die", "explicit_coin_tvd", "explicit_die_tvd", "explicit_die_tvd_v2",
                            "needle_coin", "needle_die", "needle_number", "icl_coin_tvd_theta", "cot_coin_tvd",
                            "cot_die_tvd")
OTHER_KEYS = ("claims", "absent")
SOURCE_FIELDS = ("path", "commit", "key", "aggregation", "cite")
# The value fields of each family's rows (compared by the check); everything else is a label.
VALUE_FIELDS = {
    "prior": ("mean", "std"), "prior_die": ("mean", "std"),
    "explicit_coin_tvd": ("tvd", "std"), "explicit_die_tvd": ("tvd",), "explicit_die_tvd_v2": ("tvd",),
    **{k: ("lengths", "depths", "tvd", "no_needle", "no_context") for k in ("needle_coin", "needle_die",
                                                                           "needle_number")},
    "icl_coin_tvd": ("tvd",), "icl_coin_tvd_theta": ("tvd",), "icl_die_tvd": ("tvd",),
    "gamma": ("gamma",), "poisson": ("lambda_hat", "lambda_hat_median", "n_samples"),
    "cot_coin_tvd": ("tvd",), "cot_die_tvd": ("tvd",),
}


class PublishedValuesError(BayesflipError):
    """``published.yaml`` is malformed (a row without a source field, an unknown family)."""


@lru_cache(maxsize=4)
def _load(path: str) -> dict:
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 10x


def _row_source(raw: dict, key: str, row: dict) -> dict:
    """A row's source: its family's (``sources``), then the matching ``when`` overrides, then the row's own."""
    fam = raw.get("sources", {}).get(key)
    if fam is None:
        raise PublishedValuesError(f"published.yaml: family {key!r} has no entry under 'sources'")
    src = {k: v for k, v in fam.items() if k != "when"}
    for w in fam.get("when", []):
        if all(row.get(f) == v for f, v in w["match"].items()):
            src.update(w["set"])
    src.update(row.get("source", {}))
    d = raw.get("result_dirs", {}).get(row.get("model"), "<dir>")
    src = {k: (" ".join(v.replace("{dir}", d).split()) if isinstance(v, str) else v) for k, v in src.items()}
    src.setdefault("commit", raw["source"]["commit"])
    return src


def _row(raw: dict, key: str, r: dict, names: dict) -> dict:
    src = _row_source(raw, key, r)
    out = {**copy.deepcopy(r), "published_name": r["model"], "model": names.get(r["model"], r["model"]),
           "source": src}
    if "conditions" in src:
        out["conditions"] = src["conditions"]
    return out


def load_published(path: Path | str | None = None) -> dict:
    """The published values (``published.yaml``) with model names mapped to registry names (``model``),
    the paper's name kept as ``published_name`` and every row's ``source`` filled in (see the module doc)."""
    raw = _load(str(path or PUBLISHED_PATH))
    names = raw["models"]
    out = {"source": raw["source"], "iicl_source": raw.get("iicl_source", {}), "models": dict(names),
           "result_dirs": dict(raw.get("result_dirs", {})), "sources": copy.deepcopy(raw.get("sources", {}))}
    for key in MODEL_KEYS:
        out[key] = [_row(raw, key, r, names) for r in raw.get(key, [])]
    for key in OTHER_KEYS:
        out[key] = [{**copy.deepcopy(r), **({"source": _row_source(raw, key, r)} if key == "claims" else {})}
                    for r in raw.get(key, [])]
    return out


def source_problems(pub: dict) -> list[str]:
    """Rows whose source lacks a field of :data:`SOURCE_FIELDS` or leaves a ``{dir}`` unfilled (empty = fine)."""
    bad = []
    for key in MODEL_KEYS + ("claims",):
        for i, r in enumerate(pub.get(key, [])):
            src = r.get("source") or {}
            miss = [f for f in SOURCE_FIELDS if not str(src.get(f) or "").strip()]
            if miss:
                bad.append(f"{key}[{i}] ({r.get('published_name', r.get('claim', ''))}): no {', '.join(miss)}")
            if "<dir>" in str(src.get("path", "")) or "{dir}" in str(src.get("path", "")):
                bad.append(f"{key}[{i}] ({r.get('published_name')}): no result directory for its model")
    return bad


def sources_table(pub: dict) -> pd.DataFrame:
    """One row per family: where its published numbers come from (path pattern, key, aggregation, commit);
    ``<model>`` stands for the model's result directory, per-variant paths (``when``) are listed after the path."""
    rows = []
    for key in MODEL_KEYS + ("claims",):
        s = pub.get("sources", {}).get(key)
        if not pub.get(key) or not s:
            continue

        def clean(v) -> str:
            return " ".join(str(v).replace("{dir}", "<model>").split())

        path = clean(s["path"])
        alt = [f"{', '.join(f'{k}={v}' for k, v in w['match'].items())}: {clean(w['set']['path'])}"
               for w in s.get("when", []) if "path" in w["set"]]
        if alt:
            path += " (" + "; ".join(alt) + ")"
        rows.append({"family": key, "cite": clean(s["cite"]), "path": path, "key": clean(s["key"]),
                     "aggregation": clean(s["aggregation"]),
                     "commit": str(s.get("commit") or pub["source"].get("commit", ""))[:7]})
    return pd.DataFrame(rows)


def cite(row: dict) -> str:
    """The short source string of a published row, with its note appended."""
    s = row.get("source", {})
    return s.get("cite", "") + (f" — {s['note']}" if s.get("note") else "")


# ---------------------------------------------------------------------------- tidy table
def published_table(pub: dict) -> pd.DataFrame:
    """Every published number as one tidy row: metric, model, published_name, N, theta/lam, mode, length/depth,
    value, std, median, published_source (the short cite)."""
    rows = []

    def add(metric, r, value, **kw):
        rows.append({"metric": metric, "model": r["model"], "published_name": r["published_name"], "value": value,
                     "published_source": cite(r), **kw})

    for r in pub["prior"]:
        add("prior_p_heads", r, r["mean"], std=r["std"])
    for r in pub.get("prior_die", []):
        for k, (v, sd) in enumerate(zip(r["mean"], r["std"]), start=1):
            add("prior_die_p_face", r, v, std=sd, mode=f"face {k}")
    for r in pub["icl_coin_tvd"]:
        for n, v in r["tvd"].items():
            add("icl_coin_tvd", r, v, N=int(n))
    for r in pub.get("icl_coin_tvd_theta", []):
        for n, v in r["tvd"].items():
            add("icl_coin_tvd_theta", r, v, N=int(n), theta=r["theta"])
    for r in pub["icl_die_tvd"]:
        for n, v in r["tvd"].items():
            add("icl_die_tvd", r, v, N=int(n), theta=r["bias"])
    for r in pub["gamma"]:
        add("gamma_paper", r, r["gamma"])
    for r in pub["poisson"]:
        add("poisson_lambda_hat", r, r["lambda_hat"], lam=r["lam"], mode=r["mode"],
            median=r.get("lambda_hat_median"), temperature=r.get("temperature"))
    for r in pub.get("explicit_coin_tvd", []):
        for b, v in r["tvd"].items():
            add("explicit_coin_tvd", r, v, theta=int(b) / 100, std=r.get("std", {}).get(b))
    for key in ("explicit_die_tvd", "explicit_die_tvd_v2"):
        for r in pub.get(key, []):
            for b, v in r["tvd"].items():
                add(key, r, v, theta=int(b) / 100)
    for key in ("needle_coin", "needle_die", "needle_number"):
        for r in pub.get(key, []):
            for i, length in enumerate(r["lengths"]):
                for j, depth in enumerate(r["depths"]):
                    add(key, r, r["tvd"][i][j], length=length, depth=depth)
    for key in ("cot_coin_tvd", "cot_die_tvd"):
        for r in pub.get(key, []):
            for b, v in r["tvd"].items():
                add(key, r, v, theta=int(b) / 100, mode=r["variant"])
    cols = ["metric", "model", "published_name", "N", "theta", "lam", "mode", "length", "depth", "temperature",
            "value", "std", "median", "published_source"]
    return pd.DataFrame(rows).reindex(columns=cols)


# ---------------------------------------------------------------------------- recomputation
def _avg(repo: Path, rel: str) -> dict:
    return read_averaged_stats(repo / rel)


def _statements(section: dict) -> dict[str, dict]:
    """The statement entries of a ``biased_point`` section (dicts with metrics, not ``tvd_auc``)."""
    return {k: v for k, v in section.items() if isinstance(v, dict) and ("tvd" in v or "choice_probs" in v)}


def _only_statement(stats: dict) -> dict:
    st = _statements(stats["biased_point"])
    if len(st) != 1:
        raise OriginalResultError(f"expected one statement in biased_point, found {len(st)}")
    return next(iter(st.values()))


def _tvd_entry(v: dict) -> float:
    """TVD of a pickled entry: its ``choice_probs`` against ``exp(expected_dist)`` (the original's notebooks)."""
    return float(bayes.tvd(np.asarray(v["choice_probs"], float), np.exp(np.asarray(v["expected_dist"], float))))


def _dir(pub: dict, row: dict) -> str:
    d = pub["result_dirs"].get(row["published_name"])
    if not d:
        raise OriginalResultError(f"no result directory for {row['published_name']!r} (result_dirs)")
    return d


def _re_prior(repo, d, row):
    cp = _avg(repo, f"exps/contextual/coin_flip_multiset/{d}/averaged_stats.txt")["unconditional_point"]
    return {"mean": float(cp["choice_probs"]["mean"][0]), "std": float(cp["choice_probs"]["std"][0])}


def _re_prior_die(repo, d, row):
    cp = _avg(repo, f"exps/contextual/die_roll_multiset/{d}/averaged_stats.txt")["unconditional_point"]
    return {"mean": [float(x) for x in cp["choice_probs"]["mean"]],
            "std": [float(x) for x in cp["choice_probs"]["std"]]}


def _re_explicit_coin(repo, d, row):
    st = _statements(_avg(repo, f"exps/contextual/coin_flip_multiset/{d}/averaged_stats.txt")["biased_point"])
    return {"tvd": {stated_percent(k): v["tvd"]["mean"] for k, v in st.items()},
            "std": {stated_percent(k): v["tvd"]["std"] for k, v in st.items()}}


def _faces_mean(st: dict[str, dict], value: Callable[[dict], float]) -> dict[int, float]:
    """Per stated b: the mean over the six faces (every face must be there)."""
    by: dict[int, dict[int, float]] = {}
    for k, v in st.items():
        by.setdefault(stated_percent(k), {})[stated_face(k)] = value(v)
    for b, faces in by.items():
        if sorted(faces) != [1, 2, 3, 4, 5, 6]:
            raise OriginalResultError(f"b = {b}%: faces {sorted(faces)} stored, not all six")
    return {b: float(np.mean(list(f.values()))) for b, f in by.items()}


def _re_explicit_die(sub):
    def fn(repo, d, row):
        st = _statements(_avg(repo, f"exps/contextual/{sub}/{d}/averaged_stats.txt")["biased_point"])
        return {"tvd": _faces_mean(st, lambda v: v["tvd"]["mean"])}
    return fn


def _needle(sub):
    def fn(repo, d, row):
        s = read_pickle(repo / f"exps/contextual/{sub}/{d}/stats.pkl")
        cells: dict[tuple, list[float]] = {}
        for (length, depth, _needle), v in s["needle_pivot_table"].items():
            cells.setdefault((int(length), round(float(depth), 6)), []).append(_tvd_entry(v))
        lengths = sorted({k[0] for k in cells})
        depths = sorted({k[1] for k in cells})
        tvd = [[float(np.mean(cells[(length, dep)])) if (length, dep) in cells else math.nan for dep in depths]
               for length in lengths]
        no_needle = {int(k[0]): _tvd_entry(v) for k, v in s["pivot_table"].items()}
        return {"lengths": lengths, "depths": depths, "tvd": tvd, "no_needle": no_needle,
                "no_context": _tvd_entry(s["unconditional_point"])}
    return fn


def _icl_coin_one(repo, d, n, b) -> float:
    return _only_statement(_avg(repo, f"exps/contextual/coin_flip_icl_v2/icl_{n}/{b}/{d}/averaged_stats.txt"))[
        "tvd"]["mean"]


def _re_icl_coin(repo, d, row):
    return {"tvd": {int(n): float(np.mean([_icl_coin_one(repo, d, n, b) for b in range(0, 101, 10)]))
                    for n in row["tvd"]}}


def _re_icl_coin_theta(repo, d, row):
    b = int(round(100 * float(row["theta"])))
    return {"tvd": {int(n): _icl_coin_one(repo, d, n, b) for n in row["tvd"]}}


def _re_icl_die(repo, d, row):
    b = int(round(100 * float(row["bias"])))
    out = {}
    for n in row["tvd"]:
        vals = [_only_statement(_avg(repo, f"exps/contextual/die_roll_icl_v2/icl_{n}/bias_{f}_{b}/{d}/"
                                           "averaged_stats.txt"))["tvd"]["mean"] for f in range(1, 7)]
        out[int(n)] = float(np.mean(vals))
    return {"tvd": out}


def _re_gamma(repo, d, row):
    src = row["source"]
    vals = parse_printed_values(notebook_output(repo / src["path"], int(src.get("cell", 8))))
    if d not in vals:
        raise OriginalResultError(f"{src['path']}: no printed γ for {d}")
    return {"gamma": vals[d]}


def _re_poisson(repo, d, row):
    name = "stats.pkl" if row["mode"] == "explicit" else "stats_icl.pkl"
    s = read_pickle(repo / f"exps/poisson/{d}/{name}")
    lam, temp = float(row["lam"]), float(row["temperature"])
    vals = [x for k, v in s.items() if math.isclose(k[1], lam) and math.isclose(k[2], temp) for x in v]
    if not vals:
        raise OriginalResultError(f"exps/poisson/{d}/{name}: no samples at λ = {lam}, third key {temp}")
    return {"lambda_hat": float(np.mean(vals)), "lambda_hat_median": float(np.median(vals)), "n_samples": len(vals)}


COT_DIRS = {("coin", "none"): "coin_flip/{d}", ("coin", "hard_coded"): "coin_flip/cot/{d}",
            ("coin", "hard_coded_counts"): "coin_flip/cot/{d}",
            ("coin", "in_context_prompt"): "coin_flip/cot_in_context_prompt/{d}",
            ("die", "none"): "die_roll/{d}", ("die", "hard_coded_counts"): "die_roll/cot/{d}",
            ("die", "in_context"): "die_roll/in_context/{d}"}
COUNTS_MARK = "10 times"   # the count-style hard-coded reasoning states heads "… in 10 times" flips/rolls


def _cot(process):
    def fn(repo, d, row):
        variant = row["variant"]
        s = read_pickle(repo / "exps/contextual" / COT_DIRS[(process, variant)].format(d=d) / "stats.pkl")
        st = _statements(s["biased_point"])
        if variant == "hard_coded":
            st = {k: v for k, v in st.items() if COUNTS_MARK not in k}
        elif variant == "hard_coded_counts":
            st = {k: v for k, v in st.items() if COUNTS_MARK in k}
        if process == "coin":
            return {"tvd": {stated_percent(k): _tvd_entry(v) for k, v in st.items()}}
        return {"tvd": _faces_mean(st, _tvd_entry)}
    return fn


RECOMPUTE: dict[str, Callable] = {
    "prior": _re_prior, "prior_die": _re_prior_die, "explicit_coin_tvd": _re_explicit_coin,
    "explicit_die_tvd": _re_explicit_die("die_roll_multiset"),
    "explicit_die_tvd_v2": _re_explicit_die("die_roll_multiset_v2"),
    "needle_coin": _needle("coin_flip"), "needle_die": _needle("die_roll"), "needle_number": _needle("random_number"),
    "icl_coin_tvd": _re_icl_coin, "icl_coin_tvd_theta": _re_icl_coin_theta, "icl_die_tvd": _re_icl_die,
    "gamma": _re_gamma, "poisson": _re_poisson, "cot_coin_tvd": _cot("coin"), "cot_die_tvd": _cot("die"),
}


def recompute(repo: Path | str, key: str, row: dict, pub: dict | None = None) -> dict:
    """The values of one published row recomputed from a checkout of the original repository."""
    pub = pub or load_published()
    return RECOMPUTE[key](Path(repo), _dir(pub, row), row)


@dataclass
class Mismatch:
    family: str
    model: str
    field: str
    published: object
    recomputed: object
    precision: float

    def __str__(self) -> str:
        return (f"{self.family} {self.model} {self.field}: published {self.published}, recomputed "
                f"{self.recomputed} (precision {self.precision:g})")


def _label(row: dict) -> str:
    """The published name plus the fields that tell a family's rows apart (mode, λ, θ, bias, variant)."""
    extra = [f"{k}={row[k]}" for k in ("mode", "lam", "theta", "bias", "variant") if k in row]
    return row["published_name"] + (f" [{', '.join(extra)}]" if extra else "")


def _key(k):
    """A dict key compared by value (``10``, ``10.0`` and ``"10"`` are the same grid point)."""
    try:
        return float(k)
    except (TypeError, ValueError):
        return str(k)


def _compare(want, have, path: str, tol: float):
    """Walk a published value and its recomputation together; yield (path, published, recomputed) for every
    leaf that differs by more than ``tol`` (integers: exactly), and (path, None, None) for every leaf compared."""
    if isinstance(want, dict):
        hv = {_key(k): v for k, v in have.items()} if isinstance(have, dict) else {}
        for k, v in want.items():
            if _key(k) in hv:
                yield from _compare(v, hv[_key(k)], f"{path}[{k}]", tol)
            else:
                yield f"{path}[{k}]", v, "absent in the checkout"
        return
    if isinstance(want, (list, tuple)):
        if not isinstance(have, (list, tuple)) or len(have) != len(want):
            yield path, want, f"shape differs ({have!r:.60})"
            return
        for i, (w, h) in enumerate(zip(want, have)):
            yield from _compare(w, h, f"{path}[{i}]", tol)
        return
    yield path, None, None
    if want is None or have is None:
        if want is not have:
            yield path, want, have
    elif isinstance(want, float) and math.isnan(want):
        if not math.isnan(float(have)):
            yield path, want, have
    elif isinstance(want, int) and not isinstance(want, bool) and isinstance(have, int):
        if want != have:
            yield path, want, have
    elif abs(float(want) - float(have)) > tol:
        yield path, want, round(float(have), 6)


@dataclass
class CheckResult:
    n_rows: int
    n_values: int
    mismatches: list[Mismatch]
    commit: str | None

    @property
    def ok(self) -> bool:
        return not self.mismatches


def checkout_commit(repo: Path) -> str | None:
    """The commit a git checkout's HEAD points to (read from ``.git``; None when not a readable checkout)."""
    git = repo / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def check_published(repo: Path | str, pub: dict | None = None, families: tuple[str, ...] | None = None
                    ) -> CheckResult:
    """Recompute every row of ``published.yaml`` (or of ``families``) from a checkout of the original repository.

    A value matches when ``|published − recomputed| ≤ precision`` (the row's ``source.precision``; integers
    exactly); a value that cannot be recomputed (file or key missing) is a mismatch with the reason."""
    repo = Path(repo)
    if not (repo / "exps").is_dir():
        raise BayesflipError(f"{repo} is not a checkout of rcorona/llm-coin-flips (no exps/ directory)")
    pub = pub or load_published()
    out: list[Mismatch] = []
    n_rows = n_values = 0
    for key in families or tuple(RECOMPUTE):
        for row in pub.get(key, []):
            n_rows += 1
            tol = float(row["source"].get("precision", 5e-4)) + 1e-9
            try:
                got = recompute(repo, key, row, pub)
            except (OriginalResultError, KeyError, OSError) as e:
                out.append(Mismatch(key, _label(row), "*", "-", f"not recomputable: {e}", tol))
                continue
            for field in VALUE_FIELDS[key]:
                if field not in row:
                    continue
                for path, want, have in _compare(row[field], got.get(field), field, tol):
                    if want is None and have is None:
                        n_values += 1
                    else:
                        out.append(Mismatch(key, _label(row), path, want, have, tol))
    return CheckResult(n_rows, n_values, out, checkout_commit(repo))


def check_cli(repo: str) -> int:
    """``bayesflip published --check <checkout>``: print the result; 0 when every value matches, 1 otherwise."""
    pub = load_published()
    res = check_published(repo, pub)
    want = str(pub["source"].get("commit", ""))
    print(f"published.yaml against {repo}" + (f" (HEAD {res.commit[:12]})" if res.commit else ""))
    if res.commit and want and not res.commit.startswith(want) and not want.startswith(res.commit):
        print(f"note: the values were read at commit {want[:12]}; this checkout is at {res.commit[:12]}")
    print(f"checked {res.n_values} values in {res.n_rows} entries")
    if res.ok:
        print("all match within the stated precision")
        return 0
    print(f"{len(res.mismatches)} mismatch(es):")
    for m in res.mismatches:
        print(f"  {m}")
    return 1


def list_cli() -> int:
    """``bayesflip published``: every family with its number of entries and its source."""
    pub = load_published()
    src = pub["source"]
    print(f"{src['study']} — {src['repository']} @ {str(src['commit'])[:7]}")
    for r in sources_table(pub).to_dict("records"):
        print(f"  {r['family']:20s} {len(pub[r['family']]):4d}  {r['path']}")
        print(f"  {'':20s}       key: {r['key']}")
        print(f"  {'':20s}       aggregation: {r['aggregation']}")
    for r in pub["absent"]:
        print(f"  absent: {r['what']} — {r['why']}")
    return 0
