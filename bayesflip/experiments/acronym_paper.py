"""The acronym chains of the original study (Ren et al., ``acronym_all.ipynb``), ``protocol: paper``.

Templates reproduced character for character (``INPUT_FIRST = False``, ``UPPER = True``):

* data: ``Output: EPISODE\\nInput: exalted, preteen, ...\\n\\n`` per pair (``get_data_str``);
* request (``get_data_prompt``): ``PROMPT % (data, M, "the output comes first", persona, EXAMPLE_JSON)``;
* system message: the persona of the bias type (``PERSONAS``: easy / random / imitation → common
  words, hard → rare, easylong → long, easyshort → short a lot).

Generation g ≥ 1 (one reply per chain): agent 1 (temperature T) on odd g, agent 2 (T/2) on
even g (the notebook's ``g % 2`` over its 0-based loop), no history (``LOOK_BACK = 0``). Every
``{"Output": ..., "Input": ...}`` line of the reply joins the pool (d⁰ + all generations);
the filter picks ``d^g`` (M pairs) from the pool: ``easy`` the M best-ranked acronym words,
``hard`` the M worst, ``easylong`` / ``easyshort`` the M longest / shortest known words,
``random`` M at random, ``imitation`` this generation's own pairs. Ranks: 1-based in
``wordfreq.top_n_list("en", rank_top)``, outside = ``rank_top + 1`` (COCA 60k: 60001).
"""

from __future__ import annotations

import json
import re

import numpy as np

PROMPT = ("Here are some input-output pairs. The input is a list of words. The output is the concatenation of the first "
          "letter of each word in the input, i.e., its acronym. For example:\n\n%sPlease provide %d different examples "
          "following this pattern, where %s.\n%s\nPlease return examples strictly following this format:\n%s")
SIDE = "the output comes first"
EXAMPLE_JSON = ('{"Output": "acronym", "Input": "word1, word2, ..."}\n'
                '{"Output": "acronym", "Input": "word1, word2, ..."}')
PERSONAS = {"easy": "You favor common words.", "hard": "You favor rare words.",
            "easylong": "You favor long words.", "easyshort": "You favor short words a lot.",
            "random": "You favor common words.", "imitation": "You favor common words."}
BIAS_TYPES = tuple(PERSONAS)

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def seed_pair(line: str) -> tuple[str, str]:
    """A seed-set entry ``ACRONYM: w1, w2, ...`` or the original's ``ACRONYM<TAB>w1 w2 ...`` →
    (upper-case acronym, ``"w1, w2, ..."``)."""
    head, sep, rest = line.partition("\t") if "\t" in line else line.partition(":")
    words = _WORD.findall(rest)
    if not sep or not head.strip().isalpha() or not words:
        raise ValueError(f"{line!r} is not 'ACRONYM: word1, word2, ...' (or 'ACRONYM<TAB>word1 word2 ...')")
    return head.strip().upper(), ", ".join(words)


def data_text(pairs: list[tuple[str, str]]) -> str:
    """``get_data_str``: ``Output: X\\nInput: ...\\n\\n`` per pair."""
    return "".join("Output: %s\nInput: %s\n\n" % (o, i) for o, i in pairs)


def request(pairs: list[tuple[str, str]], m: int, persona: str) -> str:
    return PROMPT % (data_text(pairs), m, SIDE, persona, EXAMPLE_JSON)


_KEY = {k: re.compile(r'"%s"\s*:\s*"([^"]*)"' % k, re.I) for k in ("output", "input")}
_PLAIN = re.compile(r"^\s*Output\s*:\s*([A-Za-z]+)\s*\n\s*Input\s*:\s*(.+?)\s*$", re.I | re.M)


def parse_reply(text: str) -> tuple[list[tuple[str, str]], int]:
    """Pairs of a reply and the number of pair-like lines that could not be read.

    As the original (``get_fblist_from_hdfeedback`` + ``json.loads``): every line that starts with
    ``{`` is one pair (``Output``/``Input`` keys, any case); where JSON fails the two keys are read by
    pattern. A reply with no such line is read in the data's own two-line ``Output: / Input:``
    format. The acronym must be letters only; the input is normalised to ``w1, w2, ...``.
    """
    pairs, bad = [], 0
    lines = [ln.strip() for ln in text.split("\n") if ln.strip().startswith("{")]
    for ln in lines:
        out = inp = None
        try:
            d = json.loads(ln)
            if isinstance(d, dict):
                low = {str(k).lower(): v for k, v in d.items()}
                out, inp = low.get("output"), low.get("input")
        except json.JSONDecodeError:
            pass
        if not isinstance(out, str) or not isinstance(inp, (str, list)):
            mo, mi = _KEY["output"].search(ln), _KEY["input"].search(ln)
            out, inp = (mo.group(1), mi.group(1)) if mo and mi else (None, None)
        pair = _clean(out, inp)
        if pair is None:
            bad += 1
        else:
            pairs.append(pair)
    if not lines:
        for m in _PLAIN.finditer(text):
            pair = _clean(m.group(1), m.group(2))
            if pair is not None:
                pairs.append(pair)
    return pairs, bad


def _clean(out, inp) -> tuple[str, str] | None:
    if isinstance(inp, list):
        inp = ", ".join(str(x) for x in inp)
    if not isinstance(out, str) or not isinstance(inp, str):
        return None
    out, words = out.strip(), _WORD.findall(inp)
    if not out.isalpha() or not words:
        return None
    return out.upper(), ", ".join(words)


def spelled(pair: tuple[str, str]) -> bool:
    """Whether the input words' first letters spell the acronym."""
    return "".join(w[0] for w in pair[1].split(", ")).lower() == pair[0].lower()


def select(kind: str, pool: list[tuple[str, str, int, int]], m: int, g: int, unknown: int,
           rng: np.random.Generator) -> list[tuple[str, str, int, int]]:
    """The filter on the pool of (acronym, input, rank, generation): ties in rank or length are
    broken by one seeded random permutation (the original's unstable sort left them arbitrary)."""
    tie = rng.permutation(len(pool))
    idx = range(len(pool))
    if kind == "easy":
        order = sorted(idx, key=lambda j: (pool[j][2], tie[j]))
    elif kind == "hard":
        order = sorted(idx, key=lambda j: (-pool[j][2], tie[j]))
    elif kind in ("easylong", "easyshort"):
        known = [j for j in idx if pool[j][2] != unknown]
        sign = -1 if kind == "easylong" else 1
        order = sorted(known, key=lambda j: (sign * len(pool[j][0]), tie[j]))
    elif kind == "random":
        order = list(rng.permutation(len(pool)))
    else:                                           # imitation: this generation's own pairs, as written
        order = [j for j in idx if pool[j][3] == g]
    return [pool[j] for j in order[:m]]
