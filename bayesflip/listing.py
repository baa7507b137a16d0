"""``bayesflip prompts``: the exact inputs of an experiment or sweep, from tokenizers only.

For every experiment × model: load the tokenizer (no weights), validate, expand the cells and
ask the family to render them (:meth:`bayesflip.experiments.base.Family.render`). ``--json``
prints one object per line with ``experiment``, ``model``, ``cell``, ``text``, ``choices`` (and
``generation`` when the family generates). ``--where key=value`` keeps cells whose coordinate
equals the value (numbers compare numerically; ``n`` is the ICL read point), ``--limit N`` keeps
the first N prompts per experiment × model. A family without a renderer gets one line, and the
listing goes on.
"""

from __future__ import annotations

import json
import math
from typing import Iterator

from .errors import BayesflipError, ConfigError


def parse_where(items: list[str] | None) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError("--where", f"{it!r} is not key=value", allowed=["theta=0.3", "n=3", "query=0"])
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _match(cell: dict, where: dict[str, str]) -> bool:
    for k, v in where.items():
        if k not in cell:
            continue  # a key this family does not have (e.g. n before rendering) filters nothing here
        x = cell[k]
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            try:
                if not math.isclose(float(x), float(v), abs_tol=1e-9):
                    return False
            except ValueError:
                return False
        elif str(x) != v:
            return False
    return True


def iter_prompts(name: str, model: str | None = None, limit: int | None = None,
                 where: dict[str, str] | None = None) -> Iterator[dict]:
    """Rendered prompts (dicts) of experiment/sweep ``name``; a family that cannot render yields
    ``{"experiment", "model", "error"}`` once."""
    from .config import load_sweep
    from .experiments import get_family
    from .models.loader import load_tokenizer
    from .models.registry import get_model_spec

    where = where or {}
    sweep = load_sweep(name, model)
    for model_name in sweep.models:
        spec = get_model_spec(model_name)
        try:
            tok = load_tokenizer(spec)
        except BayesflipError:
            raise
        except Exception as e:  # an unreachable hub tokenizer: say so, go on with the next model
            yield {"experiment": "*", "model": spec.name, "error": f"tokenizer not available ({type(e).__name__}: {e})"}
            continue
        for exp in sweep.experiments:
            fam = get_family(exp.family)
            fam.validate(exp.params, tok, spec.kind)
            cells = [c for c in fam.cells(exp.params) if _match(c, where)]
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
    where = parse_where(args.where)
    for rec in iter_prompts(args.sweep, args.model, args.limit, where):
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
    return 0


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)
