"""Sampling settings of the generating families, in one place (poisson, cot, chains, rules, acronym;
rules and acronym take the temperature from their grid and the rest from :class:`SamplingFields`).

A family's params inherit :class:`GenerationFields`::

    generation: explicit | model_defaults   (default explicit)
    do_sample: bool | null                   (null: temperature > 0, or the model's under model_defaults)
    temperature: float ≥ 0 | null            (0 = greedy; null = 1.0, or the model's under model_defaults)
    top_k: int ≥ 0 | null                    (null / 0 = no top-k cut)
    top_p: float in (0, 1] | null            (null / 1 = no nucleus cut)
    max_new_tokens: int ≥ 1

``generation: explicit`` uses exactly these fields. ``generation: model_defaults`` starts from
the model's own ``generation_config`` the way a ``transformers`` text-generation pipeline does
(``do_sample``, ``temperature``, ``top_k``, ``top_p``; an unset ``top_k`` is HF's default 50), and
then applies every field that is not null on top, as keyword arguments of ``generate`` do: the
coin-flip study's ``pipe(..., temperature=1.0, do_sample=True)`` is ``generation: model_defaults,
temperature: 1.0, do_sample: true``, and its ``model.generate(..., temperature=0.7)`` (which samples
only when the model's generation config says ``do_sample``) is ``generation: model_defaults,
temperature: 0.7``. A model whose generation config does not sample decodes greedily unless
``do_sample: true``.

Under ``model_defaults`` the generating families also store the resolved settings per cell
(string array ``generation_config``, JSON; :func:`provenance_array`).

:meth:`GenerationSettings.engine_kwargs` gives the keyword arguments of
:meth:`bayesflip.engine.Scorer.generate` (``temperature`` 0 for greedy, ``top_k``, ``top_p``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

HF_DEFAULT_TOP_K = 50
_FIELDS = ("temperature", "top_k", "top_p")


class GenerationSettings(BaseModel):
    """Resolved sampling settings of one run (what the engine is given, and what ``render`` lists)."""

    model_config = ConfigDict(extra="forbid")

    do_sample: bool = True
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    max_new_tokens: int = 100

    def engine_kwargs(self) -> dict:
        greedy = not self.do_sample or self.temperature == 0
        return {"temperature": 0.0 if greedy else float(self.temperature),
                "top_k": None if greedy or not self.top_k else int(self.top_k),
                "top_p": None if greedy or self.top_p is None or self.top_p >= 1.0 else float(self.top_p)}

    def describe(self) -> dict:
        """Plain dict for ``RenderedCell.generation`` / store attrs."""
        return {"do_sample": self.do_sample and self.temperature > 0, **self.engine_kwargs(),
                "max_new_tokens": self.max_new_tokens}


class GenerationFields(BaseModel):
    """Mixin for family params (see module docstring)."""

    generation: Literal["explicit", "model_defaults"] = "explicit"
    do_sample: Optional[bool] = None
    temperature: Optional[Annotated[float, Field(ge=0.0)]] = None
    top_k: Optional[Annotated[int, Field(ge=0)]] = None
    top_p: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = None
    max_new_tokens: int = Field(128, ge=1, le=4096)

    def generation_settings(self, model=None) -> GenerationSettings:
        return resolve(self, model)


class SamplingFields(BaseModel):
    """Mixin for families whose temperature is a grid condition (rules, acronym): the cell gives the
    temperature; ``top_k`` / ``top_p`` are explicit, or under ``generation: model_defaults`` the
    model's own generation config (HF default top_k 50) unless set."""

    generation: Literal["explicit", "model_defaults"] = "explicit"
    top_k: Optional[Annotated[int, Field(ge=0)]] = None
    top_p: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = None

    def sampling_kwargs(self, temperature: float, model=None) -> dict:
        """Keyword arguments of :meth:`bayesflip.engine.Scorer.generate` at ``temperature`` (0 = greedy)."""
        base: dict[str, Any] = {"top_k": None, "top_p": None}
        if self.generation == "model_defaults":
            d = model_generation_defaults(model) if model is not None else {"top_k": HF_DEFAULT_TOP_K, "top_p": 1.0}
            base = {"top_k": d["top_k"], "top_p": d["top_p"]}
        for k in ("top_k", "top_p"):
            if getattr(self, k) is not None:
                base[k] = getattr(self, k)
        return GenerationSettings(do_sample=temperature > 0, temperature=temperature, **base).engine_kwargs()


def provenance_array(p: GenerationFields, settings: GenerationSettings, n: int):
    """Per-cell JSON of the resolved settings (families store it as ``generation_config`` under
    ``generation: model_defaults``, where the values depend on the model)."""
    import json

    import numpy as np

    return np.asarray([json.dumps(settings.describe(), sort_keys=True)] * n, dtype=str)


def model_generation_defaults(model) -> dict:
    """``do_sample``, ``temperature``, ``top_k``, ``top_p`` of a model's ``generation_config`` (HF defaults if unset).

    ``model``: anything with a ``generation_config`` (a backend, the engine, a transformers model)."""
    gc = getattr(getattr(model, "module", model), "generation_config", None)
    def get(k: str, d: Any) -> Any:
        return getattr(gc, k, None) if getattr(gc, k, None) is not None else d

    return {"do_sample": bool(get("do_sample", False)), "temperature": float(get("temperature", 1.0)),
            "top_k": int(get("top_k", HF_DEFAULT_TOP_K)), "top_p": float(get("top_p", 1.0))}


def resolve(p: GenerationFields, model=None) -> GenerationSettings:
    """The settings of ``p`` for ``model`` (``model`` only matters for ``generation: model_defaults``)."""
    if p.generation == "explicit":
        t = 1.0 if p.temperature is None else p.temperature
        return GenerationSettings(do_sample=t > 0 if p.do_sample is None else p.do_sample, temperature=t, top_k=p.top_k, top_p=p.top_p,
                                  max_new_tokens=p.max_new_tokens)
    base = model_generation_defaults(model) if model is not None else {
        "do_sample": False, "temperature": 1.0, "top_k": HF_DEFAULT_TOP_K, "top_p": 1.0}
    for k in _FIELDS:
        if getattr(p, k) is not None:
            base[k] = getattr(p, k)
    if p.do_sample is not None:
        base["do_sample"] = p.do_sample
    return GenerationSettings(max_new_tokens=p.max_new_tokens, **base)
