"""Filler text ("haystack") of a given length in model tokens, with a needle sentence inside.

Sources (``source``):

* ``pydoc`` (default, offline): the English prose of CPython's own reference documentation,
  ``pydoc_data.topics.topics`` (shipped with every Python). Paragraphs containing code,
  grammar rules, reST headings or bullet lists are dropped; the prose is kept.
* ``file:<path>``: any UTF-8 text file (paragraphs separated by blank lines).
* ``hf:<dataset>:<split>:<column>`` or ``hf:<dataset>:<config>:<split>:<column>``: a Hugging Face
  dataset (``datasets`` is imported only then; a clear error if it is not installed).

Cleaning → sentences: paragraphs (blank-line separated) whose lines are all flush-left
prose are joined into one line (reST ``*emphasis*`` markers removed) and split into sentences
with spaCy (the coin-flip study's splitter): ``en_core_web_sm`` when it is installed, otherwise
spaCy's rule-based ``sentencizer`` on a blank English pipeline (no model download; spaCy's
tokenizer keeps abbreviations such as ``e.g.`` whole). A sentence is kept if it has 6–60
words, starts with an upper-case letter, ends in ``.!?``, contains none of
``_ { } [ ] < > | = \\ # @ $ ^ ~ * ()`` and is ≥ 85 % letters/spaces.
The sentence list is cached per process (per source).

Filler of length L for sample s (:func:`build_filler`):

1. A start index is drawn from ``numpy.random.default_rng(cell_seed(seed, "filler", s))``; the
   filler is the run of consecutive sentences from there (wrapping around), so every sample is
   coherent prose and the filler for a shorter L is (up to its cut last sentence) a prefix of
   the one for a longer L.
2. Sentences are added while ``n(k) = len(tok(" ".join(s_1..s_k)))`` (no special tokens) is
   below L; the last sentence is then cut at a word boundary (a ``.`` appended) to the number
   of words w that minimises ``|n − L|`` (w = 0 drops it). So ``token_length`` = n ≈ L
   (within a word's tokens).
3. The needle goes **between** sentences, at the boundary b ∈ {0..k} minimising
   ``|n(b) − d·L|`` (ties → the earlier boundary); d = 0 is always b = 0 (before the first
   sentence) and d = 1 always b = k (after the last). ``token_depth`` = n(b), the filler tokens
   before the needle (the needle's own tokens are not counted in either number). With few
   sentences (small L) the achievable depths are coarse; ``token_depth`` records what was got.
4. Text = ``" ".join(s_1..s_b, needle, s_{b+1}..s_k)``; with L = 0 the text is the needle alone.

``placement="paper"`` (the coin-flip study's ``inject_needle``): step 2 keeps whole sentences
(no cut: the filler has ≥ L tokens, ``token_length`` = its actual length L_doc) and the needle
goes **after** the sentence k ≥ 1 at which the running count n(k) first reaches ⌊d·L_doc⌋
(d = 0 → after the first sentence, d = 1 → after the last).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import ConfigError
from .experiments.base import cell_seed

SOURCE_FORMS = ["pydoc", "file:<path>", "hf:<dataset>:<split>:<column>", "hf:<dataset>:<config>:<split>:<column>"]
MIN_WORDS, MAX_WORDS = 6, 60
_BAD_CHARS = set("_{}[]<>|=\\#@$^~*")
_UNDERLINE = re.compile(r"^\s*([*=\-~^+#\"'`])\1{2,}\s*$")
_HF_MAX_CHARS = 5_000_000  # stop reading a dataset after this many characters of text


# ---------------------------------------------------------------------------- cleaning
def paragraphs(raw: str) -> list[str]:
    """Prose paragraphs of a text: blank-line separated, every line flush-left, no heading or list."""
    out = []
    for block in re.split(r"\n\s*\n", raw):
        lines = [ln.rstrip() for ln in block.strip("\n").split("\n") if ln.strip()]
        if not lines:
            continue
        if any(ln[:1].isspace() for ln in lines):               # code, grammar, list continuation
            continue
        if any(_UNDERLINE.match(ln) for ln in lines):           # reST heading
            continue
        first = lines[0].lstrip()
        if re.match(r"^([*\-+•]|\d+[.)]|>>>|\.\.\s)", first):   # bullet/numbered list, doctest, directive
            continue
        text = ""
        for ln in lines:
            ln = ln.strip()
            if not text:
                text = ln
            elif text.endswith("-") and not text.endswith(" -"):  # "built-\nin" -> "built-in"
                text += ln
            else:
                text += " " + ln
        text = re.sub(r"(?<![\w*])\*(\w[^*]*?)\*(?![\w*])", r"\1", text)  # reST *emphasis* -> emphasis
        out.append(re.sub(r"\s+", " ", text))
    return out


@functools.lru_cache(maxsize=1)
def sentence_splitter():
    """spaCy pipeline that sets sentence boundaries: ``en_core_web_sm`` if installed, else a blank
    English pipeline with the rule-based ``sentencizer`` (no model download)."""
    import spacy

    try:
        return spacy.load("en_core_web_sm", disable=["ner", "lemmatizer", "attribute_ruler", "tagger"])
    except OSError:
        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
        return nlp


def split_sentences(paragraph: str) -> list[str]:
    """spaCy sentence split of one paragraph (:func:`sentence_splitter`)."""
    return split_many([paragraph])[0]


def split_many(paragraphs_: Sequence[str]) -> list[list[str]]:
    """Sentences of each paragraph (spaCy ``nlp.pipe``, batched)."""
    nlp = sentence_splitter()
    nlp.max_length = max(nlp.max_length, max((len(t) for t in paragraphs_), default=0) + 1)
    return [[s.text.strip() for s in doc.sents if s.text.strip()] for doc in nlp.pipe(paragraphs_, batch_size=256)]


def is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not (MIN_WORDS <= len(words) <= MAX_WORDS):
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if any(c in _BAD_CHARS for c in sentence) or "()" in sentence or "::" in sentence:
        return False
    if sentence.startswith(("Changed in version", "Added in version", "New in version", "Deprecated since")):
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters / len(sentence) >= 0.85


def clean_sentences(raw_texts: Sequence[str]) -> list[str]:
    """Prose sentences of several raw texts, in order, duplicates removed (first kept)."""
    seen: set[str] = set()
    out = []
    paras = [para for raw in raw_texts for para in paragraphs(raw)]
    for sents in split_many(paras):
        for s in sents:
            if is_prose(s) and s not in seen:
                seen.add(s)
                out.append(s)
    return out


# ---------------------------------------------------------------------------- sources
def check_source(source: str) -> str:
    """Syntax check of a ``source`` string (no I/O); returns it. Raises ValueError otherwise."""
    if source == "pydoc":
        return source
    if source.startswith("file:") and len(source) > 5:
        return source
    if source.startswith("hf:") and len(source.split(":")) in (4, 5) and all(source.split(":")[1:]):
        return source
    raise ValueError(f"filler source {source!r} is not one of {SOURCE_FORMS}")


def _raw_texts(source: str) -> list[str]:
    if source == "pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    if source.startswith("file:"):
        path = Path(source[5:]).expanduser()
        if not path.is_file():
            raise ConfigError("params.filler", f"filler file {str(path)!r} does not exist", allowed=SOURCE_FORMS)
        return [path.read_text(encoding="utf-8", errors="replace")]
    parts = source.split(":")
    if parts[0] == "hf" and len(parts) in (4, 5):
        try:
            import datasets  # noqa: F401  (optional dependency, cluster only)
        except ModuleNotFoundError:
            raise ConfigError("params.filler", f"source {source!r} needs the 'datasets' package "
                              "(pip install datasets), or use source 'pydoc' / 'file:<path>'",
                              allowed=SOURCE_FORMS) from None
        name, config = parts[1], (parts[2] if len(parts) == 5 else None)
        split, column = parts[-2], parts[-1]
        ds = datasets.load_dataset(name, config, split=split)
        if column not in ds.column_names:
            raise ConfigError("params.filler", f"dataset {name!r} has no column {column!r}",
                              allowed=ds.column_names)
        texts, total = [], 0
        for row in ds:
            t = (row[column] or "").strip()  # one row = one paragraph (wikitext rows start with a space)
            texts.append(t)
            total += len(t)
            if total >= _HF_MAX_CHARS:
                break
        return texts
    raise ConfigError("params.filler", f"unknown filler source {source!r}", allowed=SOURCE_FORMS)


@functools.lru_cache(maxsize=8)
def load_sentences(source: str = "pydoc") -> tuple[str, ...]:
    """The cleaned sentence list of a source (cached per process)."""
    sents = clean_sentences(_raw_texts(source))
    if not sents:
        raise ConfigError("params.filler", f"source {source!r} yields no prose sentences", allowed=SOURCE_FORMS)
    return tuple(sents)


# ---------------------------------------------------------------------------- filler with needle
@dataclass(frozen=True)
class Filler:
    """A haystack: ``sentences`` (filler only), the needle's boundary index, token counts."""

    sentences: tuple[str, ...]
    needle: str
    insert_at: int        # the needle sits before sentences[insert_at] (0 = first, len = after the last)
    token_length: int     # filler tokens without the needle
    token_depth: int      # filler tokens before the needle

    @property
    def text(self) -> str:
        parts = list(self.sentences[: self.insert_at]) + ([self.needle] if self.needle else []) + \
            list(self.sentences[self.insert_at:])
        return " ".join(parts)

    @property
    def filler_text(self) -> str:
        return " ".join(self.sentences)


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0


def _tok_key(tokenizer) -> tuple:
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))


def _cut(sentence: str, w: int) -> str:
    words = sentence.split()
    if w >= len(words):
        return sentence
    s = " ".join(words[:w]).rstrip(",;:")
    return s if s[-1:] in ".!?" else s + "."


_HAY_CACHE: dict[tuple, tuple[tuple[str, ...], tuple[int, ...]]] = {}


def haystack(tokenizer, length: int, seed: int, sample: int, source: str = "pydoc", cut: bool = True
             ) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Filler sentences of ≈ ``length`` tokens and the token count n(b) at every boundary b.

    Returns ``(sentences, counts)`` with ``counts[b] = len(tok(" ".join(sentences[:b])))``,
    ``counts[0] = 0`` and ``counts[-1]`` the filler's token length. ``cut=False`` keeps the last
    sentence whole (the paper's ≥ L filler).
    """
    if length < 0:
        raise ConfigError("params.lengths", f"negative filler length {length}", allowed=["integers >= 0"])
    key = (_tok_key(tokenizer), length, seed, sample, source, cut)
    if key in _HAY_CACHE:
        return _HAY_CACHE[key]
    pool = load_sentences(source)
    rng = np.random.default_rng(cell_seed(seed, "filler", sample))
    start = int(rng.integers(len(pool)))
    sents: list[str] = []
    counts = [0]
    i = 0
    while counts[-1] < length:
        if i >= 10 * len(pool) + 10:
            raise RuntimeError(f"filler source {source!r} cannot reach {length} tokens")
        sents.append(pool[(start + i) % len(pool)])
        counts.append(_ntok(tokenizer, " ".join(sents)))
        i += 1
    if cut and sents and counts[-1] > length:
        # cut the last sentence to w words, w minimising |n - L| (w = 0 drops it)
        head = " ".join(sents[:-1])
        last = sents[-1]
        n_words = len(last.split())

        def n_at(w: int) -> int:
            return counts[-2] if w == 0 else _ntok(tokenizer, (head + " " if head else "") + _cut(last, w))

        lo, hi = 0, n_words  # smallest w with n_at(w) >= length (n_at(n_words) >= length)
        while lo < hi:
            mid = (lo + hi) // 2
            if n_at(mid) >= length:
                hi = mid
            else:
                lo = mid + 1
        cands = [w for w in (lo - 1, lo) if 0 <= w <= n_words]
        best = min(cands, key=lambda w: (abs(n_at(w) - length), -w))
        if best == 0:
            sents.pop()
            counts.pop()
        else:
            sents[-1] = _cut(last, best)
            counts[-1] = n_at(best)
    out = (tuple(sents), tuple(counts))
    _HAY_CACHE[key] = out
    return out


def insertion_index(counts: Sequence[int], depth: float, length: int) -> int:
    """Boundary b minimising |counts[b] − depth·length| (ties → earlier); d=0 → 0, d=1 → last."""
    if not 0.0 <= depth <= 1.0:
        raise ConfigError("params.depths", f"depth {depth} outside [0, 1]", allowed=["[0.0, 1.0]"])
    n = len(counts) - 1
    if depth == 0.0:
        return 0
    if depth == 1.0:
        return n
    target = depth * length
    return min(range(n + 1), key=lambda b: (abs(counts[b] - target), b))


def paper_insertion_index(counts: Sequence[int], depth: float) -> int:
    """The paper's boundary: after the first sentence k ≥ 1 with counts[k] ≥ ⌊depth·L_doc⌋ (L_doc = counts[-1])."""
    if not 0.0 <= depth <= 1.0:
        raise ConfigError("params.depths", f"depth {depth} outside [0, 1]", allowed=["[0.0, 1.0]"])
    n = len(counts) - 1
    target = int(counts[-1] * depth)
    for k in range(1, n + 1):
        if counts[k] >= target:
            return k
    return n


@dataclass(frozen=True)
class Placement:
    """How a needle goes into the filler: whether the last sentence is cut to ≈ L tokens, and the
    boundary rule ``index(counts, depth, length) -> b``."""

    cut: bool
    index: Callable[[Sequence[int], float, int], int]


PLACEMENT_RULES: dict[str, Placement] = {
    "clean": Placement(cut=True, index=insertion_index),
    "paper": Placement(cut=False, index=lambda counts, depth, length: paper_insertion_index(counts, depth)),
}
PLACEMENTS = tuple(PLACEMENT_RULES)


def build_filler(tokenizer, length: int, depth: float, needle: str, seed: int, sample: int,
                 source: str = "pydoc", placement: str = "clean") -> Filler:
    """Filler of ≈ ``length`` model tokens from sample ``sample`` with ``needle`` at token depth ≈ depth·length.

    ``placement="paper"``: whole sentences up to ≥ ``length`` tokens, needle after the sentence at
    which the running count first reaches ⌊depth·L_doc⌋ (module docstring)."""
    if placement not in PLACEMENT_RULES:
        raise ConfigError("params.placement", f"unknown placement {placement!r}", allowed=PLACEMENTS)
    rule = PLACEMENT_RULES[placement]
    sents, counts = haystack(tokenizer, length, seed, sample, source, cut=rule.cut)
    b = rule.index(counts, depth, length)
    return Filler(sentences=sents, needle=needle, insert_at=b, token_length=counts[-1], token_depth=counts[b])
