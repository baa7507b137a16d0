"""Cost of a sweep before submitting: tokens per model, time-based packing of shards into tasks.

``bayesflip plan --exp X --model-type T --dry-run`` (and ``submit --dry-run``) writes nothing and
prints per model: cells, prompt tokens, generated tokens, shards, tasks and estimated
device-minutes. All figures are **estimates**:

* **Tokens** (:meth:`bayesflip.experiments.base.Family.count_tokens`, default
  :func:`count_rendered`) are counted from the exact rendered prompts (``bayesflip prompts``)
  with a tokenizer, without a model. What is counted is what the engine forwards, approximately:
  per cell the maximal rendered texts (a learning curve's read points are prefixes of one
  sequence, forwarded once), identical texts within a shard once (the engine scores identical
  prompts once), plus the continuation tokens of multi-token choices (the first choice token is
  read from the context's last logits); a generation row forwards its prompt and samples
  ``max_new_tokens`` (an upper bound: rows stopping at EOS sample fewer). Generation-by-generation
  families (chains, rules, acronym) override ``count_tokens`` to follow their run generation by
  generation (every engine call of every generation: chunked belief reads, model turns, chat
  history, written examples and redraws); what depends on model outputs is counted at its upper
  bound or a stated assumption (each family's ``count_tokens`` docstring).
* **Sampling**: at most :data:`SAMPLE_SHARDS` evenly spaced shards (≤ :data:`SAMPLE_CELLS`
  cells) of an experiment are rendered; the other shards are interpolated linearly by shard
  index (exact when every shard is sampled), so big grids cost a few seconds.
* **Tokenizer**: a model's own when it is available offline (local / packaged models, prepared
  Hub models); a Hub model that is not prepared yet is costed with the proxy tokenizer
  :data:`PROXY_TOKENIZER` and flagged, so a sweep can be costed before anything is downloaded.
* **Time** (:func:`kind_speed`, :func:`shard_seconds`, :func:`task_seconds`): the job
  template's ``throughput`` per kind of work — scored prompt tokens, **reads** (every read point
  costs the output layer and a log-softmax: the difference between the every-position
  ``curve_tokens_per_s`` and ``score_tokens_per_s``), generated tokens — for a model of
  ``ref_params_b`` billion parameters in the figures' ``dtype``, scaled by the model's size (through
  the measured ``small`` model when given: small models are launch-bound) and dtype (measured
  ``float32`` figures, else :data:`FP32_SLOWDOWN` on paper); a calibration file
  ``$BAYESFLIP_CACHE/throughput/<template>.json`` written by ``make gpu-check`` overrides the
  template's figures.
* **Packing** (:func:`pack_work`): with a template ``target_task_min``, a model's pending shards
  (in experiment order, so one experiment's shards stay contiguous) are split into the fewest
  tasks of balanced estimated time that each fit ``target_task_min`` (model load included);
  an explicit ``--shards-per-task`` wins.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol

import numpy as np

from ..errors import BayesflipError, ConfigError

PROXY_TOKENIZER = "smollm2-135m-instruct"   # packaged with `make install`: available offline
SAMPLE_SHARDS = 8                           # at most this many shards rendered per experiment
SAMPLE_CELLS = 1000                         # ... and at most about this many cells



def sample_shards(n_shards: int, shard_size: int, max_shards: int = SAMPLE_SHARDS,
                  max_cells: int = SAMPLE_CELLS) -> list[int]:
    """Evenly spaced shard indices (first and last included) to render: all of them for small
    experiments, else at most ``max_shards`` and about ``max_cells`` cells."""
    k = max(1, min(n_shards, max_shards, max(2, max_cells // max(shard_size, 1))))
    return sorted(set(int(round(x)) for x in np.linspace(0, n_shards - 1, k)))


@dataclass
class ExperimentTokens:
    """Estimated tokens of every shard of one experiment for one tokenizer and model kind."""

    experiment: str
    shard_cells: list[int]
    prompt: list[float]
    generated: list[float]
    sampled: list[int]
    reads: list[float] = field(default_factory=list)   # read points per shard (empty: none counted)

    @property
    def exact(self) -> bool:
        return len(self.sampled) == len(self.shard_cells)


def experiment_tokens(exp, cells: list[dict], tokenizer, model_kind: str) -> ExperimentTokens:
    """Tokens per shard of ``exp``: sampled shards counted (:meth:`Family.count_tokens`), the others
    interpolated linearly by shard index."""
    from ..experiments import get_family

    fam = get_family(exp.family)
    size = exp.shard_size
    n = (len(cells) + size - 1) // size
    picks = sample_shards(n, size)
    try:
        counts = [fam.count_tokens(exp.params, cells[s * size: (s + 1) * size], tokenizer, model_kind, exp.seed)
                  for s in picks]
    except NotImplementedError as e:
        raise BayesflipError(f"experiment {exp.name}: cannot count its tokens ({e}); implement "
                             f"{type(fam).__name__}.render or count_tokens") from None
    idx = np.arange(n)
    prompt = np.interp(idx, picks, [c.prompt for c in counts])
    gen = np.interp(idx, picks, [c.generated for c in counts])
    reads = np.interp(idx, picks, [getattr(c, "reads", 0) for c in counts])
    shard_cells = [min(size, len(cells) - s * size) for s in range(n)]
    return ExperimentTokens(exp.name, shard_cells, prompt.tolist(), gen.tolist(), picks, reads.tolist())


# ---------------------------------------------------------------------- tokenizers
def tokenizer_for(spec) -> tuple[object, bool, str]:
    """(tokenizer, is_proxy, description) for costing ``spec``: its own when available offline,
    else (an unprepared Hub model) the packaged proxy tokenizer."""
    from ..models.loader import load_tokenizer
    from ..models.prepare import is_prepared
    from ..models.registry import get_model_spec

    if is_prepared(spec):
        return load_tokenizer(spec), False, "own"
    return (load_tokenizer(get_model_spec(PROXY_TOKENIZER)), True,
            f"proxy tokenizer {PROXY_TOKENIZER} (model not prepared)")


def tokenizer_key(spec, proxy: bool) -> str:
    """Models whose counts are identical share this key (same tokenizer)."""
    if proxy:
        return PROXY_TOKENIZER
    return spec.tokenizer_from or spec.name


# ---------------------------------------------------------------------- throughput
def calibration_path(template_name: str) -> Path:
    """``$BAYESFLIP_CACHE/throughput/<template>.json`` (read from the environment at call time)."""
    from ..paths import CACHE_DIR

    return Path(os.environ.get("BAYESFLIP_CACHE", CACHE_DIR)) / "throughput" / f"{template_name}.json"


def template_throughput(t) -> tuple[Optional[CostFigures], str]:
    """(Throughput or None, where the figure comes from): the calibration file of the template when
    there is one (its figures over the template's defaults; a default tied to the template's reference —
    ``load_s`` per parameter, ``curve_tokens_per_s`` as a ratio to the scoring figure — follows the file's
    ``ref_params_b`` / ``score_tokens_per_s``), else the template's ``throughput``."""
    from pydantic import ValidationError

    from ..config import pydantic_error
    from .templates import Throughput

    path = calibration_path(t.name)
    base = t.throughput.model_dump() if t.throughput else {}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError("throughput", f"unreadable calibration file ({e}); re-run `make gpu-check` or remove it",
                              source=str(path)) from None
        if not isinstance(doc, dict):
            raise ConfigError("throughput", "calibration file must hold a JSON object", source=str(path))
        fig = {k: doc[k] for k in Throughput.model_fields if k in doc and k != "source"}
        if "load_s" not in fig and "load_s" in base and "ref_params_b" in fig and base.get("ref_params_b"):
            # the template's load time is for its own reference size: keep it per parameter
            fig["load_s"] = base["load_s"] * fig["ref_params_b"] / base["ref_params_b"]
        if "curve_tokens_per_s" not in fig and base.get("curve_tokens_per_s") and "score_tokens_per_s" in fig:
            # a file without the every-position figure: keep the template's ratio to the scoring figure
            fig["curve_tokens_per_s"] = fig["score_tokens_per_s"] * base["curve_tokens_per_s"] / base["score_tokens_per_s"]
        try:
            thr = Throughput(**{**base, **fig, "source": f"calibrated {path}"})
        except ValidationError as err:
            raise pydantic_error(err, "", str(path)) from None
        what = ", ".join(str(doc[k]) for k in ("device", "measured") if doc.get(k))
        return thr, f"calibrated ({path}{': ' + what if what else ''})"
    if t.throughput:
        return t.throughput, f"template default (job_templates/{t.name}.yaml)"
    return None, "none (template has no throughput figure)"


def model_speed(score_tokens_per_s: float, gen_tokens_per_s: float, load_s: float, ref_params_b: float,
                params_b: float, active_params_b: Optional[float] = None) -> tuple[float, float, float]:
    """(scored tokens/s, generated tokens/s, load seconds) of a model of ``params_b`` billion parameters
    from a template's figures for ``ref_params_b``.

    Scoring is compute-bound at ≈ 2·N_active FLOP per token: ``score = score_ref · ref / active``.
    Batched decoding reads all N weights per step (every expert of a mixture is hit by some row):
    ``gen = gen_ref · ref / N``. Loading reads all weights: ``load = load_ref · N / ref``."""
    active = active_params_b or params_b
    return (score_tokens_per_s * ref_params_b / active, gen_tokens_per_s * ref_params_b / params_b,
            load_s * params_b / ref_params_b)


FP32_SLOWDOWN = {"score": 8.0, "curve": 8.0, "gen": 2.0}
"""On paper, GPU templates only: a float32 model vs bf16 figures (or the reverse, divided): scoring is
compute-bound (fp32 without TF32 runs at 1/15 of the bf16 tensor-core peak on an H100, 1/16 on an A100;
taken as 1/8, kernels being far from peak in either), decoding reads twice the bytes. Measured
``float32`` figures (``make gpu-check``) replace these."""


class Speed(NamedTuple):
    """Rates of one model on one template: scored tokens/s, generated tokens/s, load seconds, and the extra
    seconds of one read point (output layer + log-softmax; 0 when the template has no curve figure)."""

    score: float
    gen: float
    load: float
    read_s: float = 0.0


def _per_token(rate_ref: float, ref_b: float, n_b: float, small: Optional[tuple[float, float]] = None) -> float:
    """Seconds per token of a model of ``n_b`` billion parameters from ``rate_ref`` tokens/s at ``ref_b``:
    ``t(N) = t_ref · N / ref`` (through the origin), or with a small model's (rate, size) the line through
    both points, never below the small model's time (launch-bound: ``t(N) = t_small`` for N ≤ its size)."""
    t_ref = 1.0 / rate_ref
    if small is None:
        return t_ref * n_b / ref_b
    rate_s, size_s = small
    t_s = 1.0 / rate_s
    if size_s >= ref_b or t_s >= t_ref:           # no usable slope: linear from the reference
        return max(t_ref * n_b / ref_b, t_s if n_b <= size_s else 0.0)
    if n_b <= size_s:
        return t_s
    return t_s + (t_ref - t_s) * (n_b - size_s) / (ref_b - size_s)


def kind_speed(thr, params_b: float, active_params_b: Optional[float] = None, dtype: Optional[str] = None,
               gpu: bool = True) -> Speed:
    """:class:`Speed` of a model of ``params_b`` (``active_params_b`` per token for a mixture of experts) in
    ``dtype`` from a template's :class:`~bayesflip.hpc.templates.Throughput`.

    Per kind k (score: active parameters, compute-bound; generation: all parameters, weight reads):
    seconds per token :func:`_per_token` of the figures of the model's dtype — the template's own when the
    dtypes agree (bf16 and fp16 count as one), else the measured ``thr.float32`` / the reference, else the
    reference × :data:`FP32_SLOWDOWN` (÷ for bf16 on float32 figures; GPU templates only, 1 on a CPU).
    A read costs ``t_curve − t_score`` (curve figures: one read per token). Loading reads all weights:
    ``load = load_ref · N / ref``."""
    active = active_params_b or params_b
    model_fp32 = (dtype or thr.dtype) == "float32"
    ref_fp32 = thr.dtype == "float32"
    rates = {"score": thr.score_tokens_per_s, "gen": thr.gen_tokens_per_s, "curve": thr.curve_tokens_per_s}
    small = thr.small
    factor = {k: 1.0 for k in FP32_SLOWDOWN}
    if model_fp32 != ref_fp32:
        if model_fp32 and thr.float32 is not None:
            rates = {"score": thr.float32.score_tokens_per_s, "gen": thr.float32.gen_tokens_per_s,
                     "curve": thr.float32.curve_tokens_per_s}
            small = None                          # the small figures are for the reference dtype
        elif gpu:
            factor = {k: (1 / v if model_fp32 else v) for k, v in FP32_SLOWDOWN.items()}
            small = None

    def t(kind: str, rate: float, n: float) -> float:
        s = None
        if small is not None:
            srate = {"score": small.score_tokens_per_s, "gen": small.gen_tokens_per_s,
                     "curve": small.curve_tokens_per_s}[kind]
            s = (srate, small.ref_params_b) if srate else None
        return _per_token(rate * factor[kind], thr.ref_params_b, n, s)

    t_score = t("score", rates["score"], active)
    read_s = max(0.0, t("curve", rates["curve"], active) - t_score) if rates["curve"] else 0.0
    return Speed(1.0 / t_score, 1.0 / t("gen", rates["gen"], params_b), thr.load_s * params_b / thr.ref_params_b,
                 read_s)


def shard_seconds(prompt_tokens: float, gen_tokens: float, score_tps: float, gen_tps: float, reads: float = 0.0,
                  read_s: float = 0.0) -> float:
    """Estimated seconds of one shard: ``prompt / score_tps + reads · read_s + generated / gen_tps``."""
    return prompt_tokens / score_tps + reads * read_s + gen_tokens / gen_tps


def task_seconds(load_s: float, shard_secs: list[float]) -> float:
    """Estimated seconds of one task: one model load plus its shards."""
    return load_s + sum(shard_secs)


def pack_work(seconds: list[float], target_s: float, load_s: float) -> list[list[int]]:
    """Indices of ``seconds`` (shards in order) grouped into contiguous tasks.

    The number of tasks is the fewest whose balanced share fits: ``n = ⌈Σ seconds / (target_s − load_s)⌉``
    (at least 1; the load counted once per task); shard ``i`` goes to task ``⌊(cum_i + s_i/2) / (Σ/n)⌋``
    (cum_i: the work before it), so tasks are contiguous and about equal. A shard longer than the
    target gets a task of its own size (it cannot be split)."""
    if not seconds:
        return []
    total = float(sum(seconds))
    room = max(target_s - load_s, 1e-9)
    n = max(1, math.ceil(total / room - 1e-9))
    if total <= 0:
        return [list(range(len(seconds)))]
    per = total / n
    groups: list[list[int]] = [[] for _ in range(n)]
    cum = 0.0
    for i, s in enumerate(seconds):
        groups[min(n - 1, int((cum + s / 2) / per))].append(i)
        cum += s
    return [g for g in groups if g]


# ---------------------------------------------------------------------- per model
class CostSpec(Protocol):
    """The model facts an estimate reads (a :class:`bayesflip.models.registry.ModelSpec`)."""

    @property
    def params_b(self) -> Optional[float]: ...

    @property
    def active_params_b(self) -> Optional[float]: ...

    @property
    def dtype(self) -> str: ...


class CostTemplate(Protocol):
    """The job-template facts an estimate reads (a :class:`bayesflip.hpc.templates.JobTemplate`)."""

    @property
    def name(self) -> str: ...

    @property
    def nodes(self) -> int: ...

    @property
    def gpus_per_node(self) -> int: ...

    @property
    def cpus_per_task(self) -> int: ...

    @property
    def n_tasks(self) -> int: ...

    @property
    def time_min(self) -> int: ...

    @property
    def target_task_min(self) -> Optional[int]: ...


class CostFigures(Protocol):
    """A template's throughput figures (:class:`bayesflip.hpc.templates.Throughput`), as far as
    :class:`ModelCost` reads them itself (:func:`kind_speed` reads the rest)."""

    @property
    def ref_params_b(self) -> float: ...


@dataclass
class ModelCost:
    """Cost inputs of one model of a sweep."""

    spec: CostSpec
    template: CostTemplate
    proxy: bool
    tokenizer: str
    throughput: Optional[CostFigures]
    throughput_source: str
    tokens: dict[str, ExperimentTokens] = field(default_factory=dict)

    @property
    def params_b(self) -> Optional[float]:
        return self.spec.params_b

    def speed(self) -> Optional[Speed]:
        """(scored tok/s, generated tok/s, load s, seconds per read) for this model (:func:`kind_speed`), or
        None without a throughput figure."""
        thr = self.throughput
        if thr is None:
            return None
        p = self.params_b or thr.ref_params_b
        return kind_speed(thr, p, self.spec.active_params_b, self.spec.dtype, gpu=self.template.gpus_per_node > 0)

    def shard_seconds(self, exp: str, shard: int) -> float:
        sp = self.speed()
        if sp is None:
            return float("nan")
        t = self.tokens[exp]
        reads = t.reads[shard] if t.reads else 0.0
        return shard_seconds(t.prompt[shard], t.generated[shard], sp.score, sp.gen, reads, sp.read_s)

    @property
    def packable(self) -> bool:
        return self.template.target_task_min is not None and self.throughput is not None

    def pack(self, work: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
        """``work`` (experiment, shard) in order → task work lists of about ``target_task_min``."""
        sp, target = self.speed(), self.template.target_task_min
        assert sp is not None and target is not None   # callers pack only when self.packable
        secs = [self.shard_seconds(e, s) for e, s in work]
        groups = pack_work(secs, target * 60.0, sp[2])
        return [[work[i] for i in g] for g in groups]

    @property
    def devices_per_task(self) -> tuple[int, str]:
        """(devices one task holds, unit): GPUs, or CPU cores for CPU templates."""
        t = self.template
        if t.gpus_per_node:
            return t.gpus_per_node * t.nodes, "GPU"
        return t.cpus_per_task * t.n_tasks, "CPU"


def estimate_models(sweep, units, templates: dict, cells_cache: Optional[dict] = None,
                    tokenizers: Optional[dict] = None) -> dict[str, ModelCost]:
    """Per model of the sweep: tokenizer (own or proxy), throughput and per-shard tokens of every
    experiment. ``tokenizers`` (model → (tokenizer, proxy, description)) is filled as a side effect so
    that planning can reuse them; counts are shared between models with the same tokenizer and kind."""
    from ..experiments import get_family

    cells_cache = {} if cells_cache is None else cells_cache
    tokenizers = {} if tokenizers is None else tokenizers
    shared: dict[tuple, ExperimentTokens] = {}
    out: dict[str, ModelCost] = {}
    for name in sweep.models:
        spec = next((u.model for u in units if u.model.name == name), None)
        if spec is None:
            from ..models.registry import get_model_spec
            spec = get_model_spec(name)
        if name not in tokenizers:
            tokenizers[name] = tokenizer_for(spec)
        tok, proxy, desc = tokenizers[name]
        thr, src = template_throughput(templates[name])
        mc = ModelCost(spec, templates[name], proxy, desc, thr, src)
        for exp in sweep.experiments:
            key = (exp.name, tokenizer_key(spec, proxy), spec.kind)
            if key not in shared:
                if exp.name not in cells_cache:
                    cells_cache[exp.name] = get_family(exp.family).cells(exp.params)
                shared[key] = experiment_tokens(exp, cells_cache[exp.name], tok, spec.kind)
            mc.tokens[exp.name] = shared[key]
        out[name] = mc
    return out


# ---------------------------------------------------------------------- report
def cost_rows(costs: dict[str, ModelCost], units, arrays, packing: bool = True) -> list[dict]:
    """One row per model: cells, tokens, shards and tasks of the pending work, estimated minutes.
    ``packing``: whether the arrays were packed by time (False after an explicit ``--shards-per-task``)."""
    rows = []
    for name, mc in costs.items():
        tasks = [t for a in arrays if a.model.name == name for t in a.tasks]
        work = [w for t in tasks for w in t.work]
        cells = sum(mc.tokens[e].shard_cells[s] for e, s in work)
        prompt = sum(mc.tokens[e].prompt[s] for e, s in work)
        gen = sum(mc.tokens[e].generated[s] for e, s in work)
        sp = mc.speed()
        n_dev, unit = mc.devices_per_task
        row: dict[str, Any] = {"model": name, "template": mc.template.name, "params_b": mc.params_b, "cells": int(cells),
               "prompt_tokens": int(round(prompt)), "generated_tokens": int(round(gen)), "shards": len(work),
               "tasks": len(tasks), "packed": bool(packing and mc.packable), "target_task_min": mc.template.target_task_min,
               "time_min": mc.template.time_min, "devices_per_task": n_dev, "device_unit": unit,
               "tokenizer": mc.tokenizer, "proxy_tokenizer": mc.proxy, "throughput_source": mc.throughput_source,
               "exact_tokens": all(mc.tokens[e].exact for e in {e for e, _ in work}),
               "task_minutes": None, "max_task_minutes": None, "device_minutes": None, "experiments": {}}
        for e, s in work:
            x = row["experiments"].setdefault(e, {"shards": 0, "cells": 0, "prompt_tokens": 0.0,
                                                  "generated_tokens": 0.0, "reads": 0.0, "exact": mc.tokens[e].exact})
            x["shards"] += 1
            x["cells"] += mc.tokens[e].shard_cells[s]
            x["prompt_tokens"] += mc.tokens[e].prompt[s]
            x["generated_tokens"] += mc.tokens[e].generated[s]
            x["reads"] += mc.tokens[e].reads[s] if mc.tokens[e].reads else 0.0
        for x in row["experiments"].values():
            x["prompt_tokens"], x["generated_tokens"] = int(round(x["prompt_tokens"])), int(round(x["generated_tokens"]))
            x["reads"] = int(round(x["reads"]))
        if sp is not None:
            mins = [task_seconds(sp[2], [mc.shard_seconds(e, s) for e, s in t.work]) / 60 for t in tasks]
            row.update(task_minutes=round(sum(mins) / len(mins), 2) if mins else 0.0,
                       max_task_minutes=round(max(mins), 2) if mins else 0.0,
                       device_minutes=round(sum(mins) * n_dev, 2), load_s=round(sp.load, 1),
                       score_tokens_per_s=round(sp.score), gen_tokens_per_s=round(sp.gen),
                       read_us=round(sp.read_s * 1e6, 2))
        rows.append(row)
    return rows


def _tok(n: float) -> str:
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{suf}"
    return f"{int(n)}"


def format_cost(sweep_name: str, rows: list[dict]) -> str:
    """The dry run's table: per model, then a total line, then where tokenizers/figures come from."""
    head = (f"cost estimate of sweep {sweep_name} (nothing written; estimates: tokens counted on sampled shards "
            f"of the rendered prompts, generated tokens at max_new_tokens, time from the template throughput)")
    cols = ["model", "template", "cells", "prompt tok", "gen tok", "shards", "tasks", "min/task", "max", "device-min"]
    table = []
    for r in rows:
        dm = "n/a" if r["device_minutes"] is None else f"{r['device_minutes']:.1f} {r['device_unit']}"
        table.append([r["model"] + ("*" if r["proxy_tokenizer"] else ""), r["template"], f"{r['cells']:,}",
                      _tok(r["prompt_tokens"]), _tok(r["generated_tokens"]), str(r["shards"]), str(r["tasks"]),
                      "n/a" if r["task_minutes"] is None else f"{r['task_minutes']:.1f}",
                      "n/a" if r["max_task_minutes"] is None else f"{r['max_task_minutes']:.1f}", dm])
    by_unit: dict[str, float] = {}
    for r in rows:
        if r["device_minutes"] is not None:
            by_unit[r["device_unit"]] = by_unit.get(r["device_unit"], 0.0) + r["device_minutes"]
    table.append(["total", "", f"{sum(r['cells'] for r in rows):,}", _tok(sum(r["prompt_tokens"] for r in rows)),
                  _tok(sum(r["generated_tokens"] for r in rows)), str(sum(r["shards"] for r in rows)),
                  str(sum(r["tasks"] for r in rows)), "", "",
                  " + ".join(f"{v:.1f} {u}" for u, v in sorted(by_unit.items())) or "n/a"])
    widths = [max(len(x[i]) for x in [cols, *table]) for i in range(len(cols))]
    def fmt(xs):
        return "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths)))
    lines = [head, fmt(cols), *map(fmt, table)]
    lines.append("device-min = estimated task minutes (model load included) × devices per task; "
                 "min/task = mean estimated task, max = longest")
    proxied = [r["model"] for r in rows if r["proxy_tokenizer"]]
    if proxied:
        lines.append(f"* tokens counted with proxy tokenizer {PROXY_TOKENIZER} (model not prepared): "
                     f"{', '.join(proxied)}")
    unsized = [r["model"] for r in rows if r["params_b"] is None and r["device_minutes"] is not None]
    if unsized:
        lines.append(f"models without params_b in the registry, timed at their template's reference size: "
                     f"{', '.join(unsized)}")
    seen = set()
    for r in rows:
        if r["template"] in seen:
            continue
        seen.add(r["template"])
        pack = (f"packed to ~{r['target_task_min']} min/task" if r["packed"] else
                "fixed shards_per_task (no target_task_min/throughput, or --shards-per-task)")
        lines.append(f"template {r['template']}: throughput {r['throughput_source']}; {pack}; time_min {r['time_min']}")
    for r in rows:
        if r["max_task_minutes"] is not None and r["max_task_minutes"] > 0.9 * r["time_min"]:
            lines.append(f"warning: {r['model']}: a task is estimated at {r['max_task_minutes']:.0f} min, "
                         f"close to or over time_min {r['time_min']} (it will be checkpointed and requeued)")
    return "\n".join(lines)
