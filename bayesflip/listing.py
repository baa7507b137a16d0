"""``bayesflip prompts``: the exact inputs of an experiment or sweep, from tokenizers only.

For every experiment × model: load the tokenizer (no weights), validate, expand the cells and
ask the family to render them (:meth:`bayesflip.experiments.base.Family.render`). ``--json``
prints one object per line with ``experiment``, ``model``, ``cell``, ``text``, ``choices`` (and
``generation`` when the family generates). ``--where key=value`` keeps cells whose coordinate
equals the value (numbers compare numerically; ``n`` is the ICL read point; an experiment without
the key is not filtered by it), ``--limit N`` keeps the first N prompts per experiment × model. A
family without a renderer gets one line, and the listing goes on.

``--where`` is checked before anything is listed: a key no experiment of the listing has is one
``bayesflip: error:`` line with a "did you mean" and the allowed keys, a value that does not parse
as the key's type (``theta=abc``) too (exit 2); a filter that matches no prompt ends with one line
naming the values the keys take, exit 1. Unprepared Hub models fail first, offline (exit 2).
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from typing import Iterator

from .errors import ConfigError


def parse_where(items: list[str] | None) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError("--where", f"{it!r} is not key=value", allowed=["theta=0.3", "n=3", "query=0"])
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _type(x) -> str:
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, (int, float)):
        return "number"
    return "text"


BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parses(v: str, kind: str) -> bool:
    if kind == "number":
        try:
            float(v)
        except ValueError:
            return False
        return True
    return kind != "bool" or v.lower() in BOOLS


def _equal(x, v: str) -> bool:
    kind = _type(x)
    if kind == "bool":
        return BOOLS.get(v.lower()) is x
    if kind == "number":
        try:
            y = float(v)
        except ValueError:
            return False
        return (math.isnan(x) and math.isnan(y)) or math.isclose(float(x), y, abs_tol=1e-9)
    return str(x) == v


def _match(cell: dict, where: dict[str, str]) -> bool:
    for k, v in where.items():
        if k not in cell:
            continue  # a key this family does not have (e.g. n before rendering) filters nothing here
        if not _equal(cell[k], v):
            return False
    return True


def where_catalog(fam, params, cells: list[dict], tok, kind: str, seed: int) -> dict[str, dict]:
    """key → {"types": set of value types, "values": distinct values} of one experiment's cells and of
    the read points its renderer adds (``n``, ``stage``, ``generation``: from rendering its first cell)."""
    out: dict[str, dict] = {}

    def note(c: dict) -> None:
        for k, x in c.items():
            e = out.setdefault(k, {"types": set(), "values": set()})
            e["types"].add(_type(x))
            if len(e["values"]) < 1000:
                e["values"].add(x if not isinstance(x, (list, dict)) else repr(x))

    for c in cells:
        note(c)
    try:
        for r in fam.render(params, cells[:1], tok, kind, seed):
            note(r.cell)
    except NotImplementedError:
        pass   # a family without a renderer: its cell keys only (the listing says it cannot render)
    return out


def check_where(where: dict[str, str], catalog: dict[str, dict]) -> None:
    """Every ``--where`` key exists in some experiment of the listing (else one line with a "did you
    mean" and the allowed keys) and its value parses as that key's type (a number for ``theta``)."""
    for k, v in where.items():
        if k not in catalog:
            close = difflib.get_close_matches(k, list(catalog), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError("--where", f"unknown key {k!r}{hint}", allowed=sorted(catalog))
        types = catalog[k]["types"]
        if not any(_parses(v, t) for t in types):     # any value parses as text
            raise ConfigError("--where", f"{k}={v!r} does not parse: {k} is a {' or '.join(sorted(types))}",
                              allowed=_sample(catalog[k]["values"]))


def _sample(values, n: int = 12) -> list:
    vals = sorted(values, key=lambda x: (str(type(x)), x if isinstance(x, (int, float)) else str(x)))
    return vals if len(vals) <= n else [*vals[: n - 1], "...", vals[-1]]


def iter_prompts(name: str, model: str | None = None, limit: int | None = None,
                 where: dict[str, str] | None = None, catalog: dict | None = None) -> Iterator[dict]:
    """Rendered prompts (dicts) of experiment/sweep ``name``; a family that cannot render yields
    ``{"experiment", "model", "error"}`` once. With ``where``, the keys and values are checked first
    (:func:`check_where`, before anything is yielded); ``catalog`` (a dict) receives the keys and values
    the listing offers. Unprepared Hub models fail first, without network (exit 2 at the command line)."""
    from .config import load_sweep, sweep_models
    from .experiments import get_family
    from .models.prepare import require_prepared_models

    require_prepared_models(sweep_models(name, model))
    from .models.loader import load_tokenizer
    from .models.registry import get_model_spec

    where = where or {}
    catalog = {} if catalog is None else catalog
    sweep = load_sweep(name, model)
    cells_of: dict[str, list] = {}
    for mi, model_name in enumerate(sweep.models):
        spec = get_model_spec(model_name)
        tok = load_tokenizer(spec)
        for exp in sweep.experiments:
            fam = get_family(exp.family)
            fam.validate(exp.params, tok, spec.kind)
            if exp.name not in cells_of:
                cells_of[exp.name] = fam.cells(exp.params)
            if where and mi == 0:
                for k, e in where_catalog(fam, exp.params, cells_of[exp.name], tok, spec.kind, exp.seed).items():
                    c = catalog.setdefault(k, {"types": set(), "values": set()})
                    c["types"] |= e["types"]
                    c["values"] |= e["values"]
        if where and mi == 0:
            check_where(where, catalog)
        for exp in sweep.experiments:
            fam = get_family(exp.family)
            cells = [c for c in cells_of[exp.name] if _match(c, where)]
            n = 0
            step = max(1, min(limit or 64, 64))
            try:
                for i in range(0, len(cells), step):
                    for r in fam.render(exp.params, cells[i: i + step], tok, spec.kind, exp.seed):
                        if not _match(r.cell, where):
                            continue
                        cell = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.cell.items()}
                        rec = {"experiment": exp.name, "model": spec.name, "cell": cell, "text": r.text,
                               "choices": r.choices}
                        if r.generation is not None:
                            rec["generation"] = r.generation
                        yield rec
                        n += 1
                        if limit is not None and n >= limit:
                            break
                    if limit is not None and n >= limit:
                        break
            except NotImplementedError as e:
                yield {"experiment": exp.name, "model": spec.name, "error": str(e)}


def prompts_cli(args) -> int:
    """Exit 0 with prompts listed; 1 when a ``--where`` filter matches no prompt (one line on stderr
    naming the values the filtered keys take); 2 for a bad filter or an unprepared model."""
    where = parse_where(args.where)
    catalog: dict = {}
    listed = 0
    for rec in iter_prompts(args.sweep, args.model, args.limit, where, catalog):
        if "error" in rec:
            print(f"# {rec['experiment']} x {rec['model']}: {rec['error']}")
            continue
        if args.json:
            print(json.dumps(rec, default=_jsonable))
        else:
            cell = ", ".join(f"{k}={v}" for k, v in rec["cell"].items())
            print(f"== {rec['experiment']} x {rec['model']} [{cell}]")
            print(rec["text"])
            if rec.get("choices") is not None:
                print(f"   choices: {rec['choices']}")
            if rec.get("generation") is not None:
                print(f"   generation: {rec['generation']}")
        listed += 1
    if where and not listed:
        takes = "; ".join(f"{k} takes {', '.join(map(str, _sample(catalog[k]['values'])))}" for k in where)
        print(f"bayesflip: no prompt of {args.sweep} matches --where "
              f"{' '.join(f'{k}={v}' for k, v in where.items())} ({takes})", file=sys.stderr)
        return 1
    return 0


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)
