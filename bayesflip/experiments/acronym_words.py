"""The acronym game's pure helpers (:mod:`.acronym`): parsing and formatting pairs, word
frequencies and ranks (``wordfreq``), the clean pool filter and the paper protocol's d⁰.

Both protocols' runs (:mod:`.acronym_run`) and the family (:mod:`.acronym`) import them from
here; the definitions (valid pair, Zipf score, rank) are in :mod:`.acronym`'s docstring.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from ..errors import ConfigError
from . import acronym_paper as AP
from .base import cell_seed

_LINE = re.compile(r"^\s*([A-Za-z]+)\s*[:=]\s*(.+?)\s*$")
_WORD = re.compile(r"[A-Za-z']+")


def parse_pair(line: str, length: int) -> tuple[str, list[str]] | None:
    """``(WORD, [words])`` if the first line is a valid pair of this length, else None."""
    first = line.strip().split("\n", 1)[0] if line.strip() else ""
    m = _LINE.match(first)
    if not m:
        return None
    word, words = m.group(1), _WORD.findall(m.group(2))
    if len(word) != length or len(words) != length:
        return None
    if "".join(w[0] for w in words).lower() != word.lower():
        return None
    return word.upper(), [w.lower() for w in words]


def format_pair(word: str, words: list[str]) -> str:
    return f"{word.upper()}: {' '.join(words)}"


def zipf(word: str) -> float:
    """Zipf frequency of an English word (``wordfreq``; 0 for unknown words)."""
    from wordfreq import zipf_frequency

    return float(zipf_frequency(word, "en"))


@lru_cache(maxsize=4)
def _ranks(top: int) -> dict[str, int]:
    from wordfreq import top_n_list

    return {w: i + 1 for i, w in enumerate(top_n_list("en", top))}


def rank(word: str, top: int) -> int:
    """1-based rank in ``top_n_list("en", top)``; ``top + 1`` when outside it."""
    return _ranks(top).get(word.lower(), top + 1)


def word_stats(pairs: list[tuple[str, list[str]]], common_zipf: float, top: int) -> tuple[float, float, float]:
    """(share_common, mean_rank, mean_zipf) over all input words of the pairs (NaN if none)."""
    words = [w for _, ws in pairs for w in ws]
    if not words:
        return float("nan"), float("nan"), float("nan")
    z = np.array([zipf(w) for w in words])
    r = np.array([rank(w, top) for w in words], dtype=float)
    return float(np.mean(z >= common_zipf)), float(r.mean()), float(z.mean())


def pool_filter(kind: str, valid: list, keep: int, rng: np.random.Generator) -> list:
    """Pool-and-filter: top / bottom ``keep`` by mean Zipf of the input words, or a random ``keep``."""
    if kind == "none":
        idx = sorted(rng.choice(len(valid), size=min(keep, len(valid)), replace=False).tolist())
        return [valid[j] for j in idx]
    score = [float(np.mean([zipf(w) for w in ws])) for _, ws in valid]
    order = sorted(range(len(valid)), key=lambda j: (-score[j] if kind == "most" else score[j], j))
    return [valid[j] for j in order[:keep]]


def _seed_pairs(p, key: str) -> list[tuple[str, str]]:
    try:
        return [AP.seed_pair(x) for x in getattr(p, key)]
    except ValueError as e:
        raise ConfigError(f"params.{key}", str(e), allowed=["'ACRONYM: word1, word2, ...'",
                                                             "'ACRONYM<TAB>word1 word2 ...'"]) from None


def _halves(p) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The easy set's pairs ranked within ``rank_top`` and the hard set's ranked beyond it."""
    easy = [x for x in _seed_pairs(p, "easy_set") if rank(x[0], p.rank_top) <= p.rank_top]
    hard = [x for x in _seed_pairs(p, "hard_set") if rank(x[0], p.rank_top) > p.rank_top]
    return easy, hard


def paper_d0(p, cell: dict, seed: int) -> list[tuple[str, str]]:
    """``generate_d0``: m_easy easy + (M − m_easy) hard pairs, shuffled, by (seed, m_easy, d0 seed)."""
    easy, hard = _halves(p)
    rng = np.random.default_rng(cell_seed(seed, "acronym-d0", cell["m_easy"], cell["d0_seed"]))
    pick_e = rng.choice(len(easy), size=cell["m_easy"], replace=False)
    pick_h = rng.choice(len(hard), size=p.pairs - cell["m_easy"], replace=False)
    d0 = [easy[j] for j in pick_e] + [hard[j] for j in pick_h]
    return [d0[j] for j in rng.permutation(len(d0))]
