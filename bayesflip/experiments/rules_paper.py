"""The rule game of the original study (Ren et al., ``ARCE_experiments0*`` + ``utils/standard_prompts.py``).

Templates reproduced character for character (``%`` formatting as in the original):

* game prompt (system message): ``GAME`` with ``N`` = 5, the object list's Python repr
  ``['A', 'B', 'C', 'D', 'screen']`` and the start bias sentence (empty for none, so the
  line then ends ``". \\n"``);
* rule format: ``RULE_FORMAT`` + (``"\\n"`` + end bias sentence, or nothing);
* data: ``Input: A, B\\nOutput: on\\n`` per example (``gen_data_prompt``);
* rule request ``HD`` (``gen_hd_prompt``), example request ``DH`` (``gen_dh_prompt``),
  self-refinement ``SEARCH`` (``gen_h_search_prompt``), hypothesis-refinement feedback
  ``REFINE`` / ``REFINE_OK`` (``gen_h_refine_prompt``).

A rule is shown to the model as the original's Python ``%s`` of the rule dict
(``{'A': 'on', ..., 'screen': 'und'}``) when it is the model's own parsed rule, and as JSON
(``{"A": "on", ...}``) when it came from a refinement reply (the original passed the reply's
string on), see :func:`rule_repr`. The model states rules as ``Rule: {"A": "on", ...}``
(``json.dumps`` of the dict, keys in object order): that is the text teacher-forced.

The chat history is the original ``multi_turn_chatgpt``: rule and example requests (with
the model's answers) are rounds; only the last ``look_back`` rounds are sent; refinement
turns are sent with that history but not recorded in it.
"""

from __future__ import annotations

import json
import re

import numpy as np

OBJECTS = ("A", "B", "C", "D", "screen")
VALUES = ("on", "off", "und")

GAME = ('Let us play a rule following game. You need to generate a rule that maps the following inputs to their '
        'corresponding outputs, or generate examples following a given rule. Each example is an input-output pair. '
        'The input is a list of objects. If any objects with status on in the input, the output should be on. If all '
        'objects in the input are off, the output is off. If only objects with off and und in the list, the output '
        'should be undetermined (und for short). The output is either "on", "off", or "und", indicating the state of '
        'the light. For each object, determine whether it triggers the light to turn on, does not trigger it, or if it '
        'is undetermined. We only have %d objects in this game: %s. %s\n')
RULE_FORMAT = 'Rule: {"object 1": <"on"/"off"/"und">, "object 2": <"on"/"off"/"und">, ...}%s'
HD = ('You now have more examples, generate a rule that maps the all the inputs (including those in previous rounds) '
      'to their corresponding outputs.\n\n%sPlease format your rule in the following format.\n%s\nWe only have five '
      'objects, they are ["A", "B", "C", "D", "screen"].\nPlease ONLY return the rule!\nPlease ONLY return the rule!\n'
      'Please ONLY return the rule!\n')
DH_EXAMPLE = 'Input: obj1, obj2, ...\nOutput: on/off/und\n\nInput: obj1, obj2, ...\nOutput: on/off/und\n'
DH_RESTATE = ('Remember the input is a list of objects. If any objects with status on in the input, the output should be '
              'on. If all objects in the input are off, the output is off. If only objects with off and und in the '
              'list, the output should be undetermined (und for short).')
DH = ('The rule you provided is %s. Based on this rule, can you give %d more examples? %s Please ONLY return the '
      'input-output pairs strictly following this format:\n\n%s')
SEARCH = ('The rule you give is %s. Please verify whether it can explain the following examples. If not, refine your '
          'rule to make sure it applies to all the examples. If yes, return the correct rule.\n\n%s\nWe only have five '
          'objects, they are ["A", "B", "C", "D", "screen"].\nPlease ONLY return a JSON following this format:\n'
          '-reason: str, how you refine your rule\n-Rule: str, in the format %s')
REFINE_ITEM = "Input: %s\nPredict output: %s\nGround truth output: %s\n\n"
REFINE = ("The rule you give is %s. Applying it to the following inputs does not produce the expected outputs.\n\n"
          "%sPlease refine your rule based on the above feedback to make sure it applies to all the examples.\n"
          "Please format your rule in the following format.\n%s\nPlease only return the rule without any explanations.")
REFINE_OK = "The rule you provided is %s, which fits all examples, well done!"

BIAS_SENTENCES = {"strong": "Turn off the screen after the experiment.",
                  "medium": "John will turn off the screen after the experiment.",
                  "weak": "John will close the screen after the experiment.",
                  "none": ""}
POSITIONS = ("start", "end", "both")


def bias_parts(sentences: dict[str, str], bias: str, position: str) -> tuple[str, str]:
    """(start sentence, end sentence) of a (bias, position) condition; ``none`` has neither."""
    s = sentences.get(bias, "")
    return (s if position in ("start", "both") else "", s if position in ("end", "both") else "")


def game_prompt(start: str) -> str:
    return GAME % (len(OBJECTS), list(OBJECTS), start)


def rule_format(end: str) -> str:
    return RULE_FORMAT % (("\n" + end) if end else "")


def rule_dict(h) -> dict[str, str]:
    return dict(zip(OBJECTS, h))


def rule_json(h) -> str:
    """How the model states a rule: ``{"A": "on", ..., "screen": "off"}`` (``json.dumps``)."""
    return json.dumps(rule_dict(h))


def rule_repr(h, from_reply: bool) -> str:
    """The rule inside later prompts: JSON when it came from a refinement reply, else the dict's Python repr."""
    return rule_json(h) if from_reply else str(rule_dict(h))


def data_text(subsets, inputs, outputs) -> str:
    """``gen_data_prompt``: ``Input: A, B\\nOutput: on\\n`` per example."""
    return "".join("Input: %s\nOutput: %s\n" % (", ".join(subsets[int(i)]), VALUES[int(o)])
                   for i, o in zip(inputs, outputs))


def hd_prompt(data: str, fmt: str) -> str:
    return HD % (data, fmt)


def dh_prompt(m: int, rule: str) -> str:
    return DH % (rule, m, DH_RESTATE, DH_EXAMPLE)


def search_prompt(h, d0: str, fmt: str) -> str:
    return SEARCH % (str(rule_dict(h)), d0, fmt[6:])


def refine_prompt(h, subsets, d0_inputs, d0_outputs, table_row, fmt: str) -> tuple[str, bool]:
    """(feedback, needs_refinement) of ``gen_h_refine_prompt`` for rule ``h`` against d⁰."""
    items = "".join(REFINE_ITEM % (", ".join(subsets[int(i)]), VALUES[int(table_row[int(i)])], VALUES[int(o)])
                    for i, o in zip(d0_inputs, d0_outputs) if int(table_row[int(i)]) != int(o))
    if items:
        return REFINE % (str(rule_dict(h)), items, fmt), True
    return REFINE_OK % str(rule_dict(h)), False


_PAIR = re.compile(r"Input\s*:\s*(.*?)\s*\n\s*Output\s*:\s*\"?([A-Za-z]+)", re.I)
_INPUT = re.compile(r"Input\s*:", re.I)


def parse_examples(text: str, subsets) -> tuple[list[tuple[int, int]], int]:
    """Model-written examples → ``([(subset index, value index)], n_invalid)``.

    Every ``Input: ... / Output: ...`` pair is read (markdown, quotes and brackets around the
    objects are ignored; objects are matched case-insensitively, ``screen`` by name); a pair whose
    objects are not a non-empty set of distinct known objects or whose output is not
    on/off/und is invalid; an ``Input:`` line without an output is invalid too.
    """
    names = {o.lower(): o for o in OBJECTS}
    order = {o: k for k, o in enumerate(OBJECTS)}
    index = {tuple(s): k for k, s in enumerate(subsets)}
    out: list[tuple[int, int]] = []
    bad = 0
    matched = 0
    text = re.sub(r"[*`#]", "", text)             # markdown emphasis / code / headings
    for m in _PAIR.finditer(text):
        matched += 1
        raw = re.sub(r"[\[\]\"'`*{}()]", " ", m.group(1))
        objs = [x.strip().lower() for x in re.split(r"[,;]|\s+and\s+", raw) if x.strip()]
        val = m.group(2).lower()
        if not objs or any(o not in names for o in objs) or len(set(objs)) != len(objs) or val not in VALUES:
            bad += 1
            continue
        key = tuple(sorted((names[o] for o in objs), key=order.__getitem__))
        out.append((index[key], VALUES.index(val)))
    bad += max(0, len(_INPUT.findall(text)) - matched)
    return out, bad


def sample_d0(consistent_inputs: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """``sample_d0_under_hbar``: m distinct inputs on which h* and h̄ agree (seeded, without replacement)."""
    return consistent_inputs[rng.permutation(len(consistent_inputs))[:m]]
