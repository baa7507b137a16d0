"""The ``bayesflip`` command line: score, models, plan/run/debug/submit/status, reduce, reference, demo, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .environment import check_environment
from .errors import BayesflipError, Interrupted


def _cmd_score(args) -> int:
    from .models.prepare import require_prepared_models
    from .models.registry import get_model_spec

    spec = get_model_spec(args.model)          # unknown model -> clear error before loading
    require_prepared_models([spec.name])       # an unprepared Hub model -> the `models prepare` hint, no network
    from .engine import Scorer, score_prompts
    from .models.loader import load_model
    from .prompts import Prompt, validate_choices

    validate_choices(args.choice)              # empty / duplicate -> clear error before loading
    if args.chat and spec.kind != "instruct":
        raise BayesflipError(f"--chat needs an instruct model; {spec.name} is kind {spec.kind}")
    lm = load_model(spec, device=args.device)
    if args.chat:
        user = args.user or "Please answer."
        prompt = Prompt(text=args.prompt, messages=(("user", user),))
    else:
        prompt = Prompt(text=args.prompt)
    res = score_prompts(Scorer(lm), [prompt], args.choice, terminator=args.terminator)[0]
    if args.json:
        print(json.dumps(res.to_json(spec.name)))
    else:
        print(f"model: {spec.name} ({lm.revision})")
        for c, lp, p in zip(res.choices, res.logprobs, res.probs):
            print(f"  {c!r:>14}  logprob {lp:9.4f}   p(renorm) {p:.4f}")
        print(f"  off-choice mass: {res.off_choice_mass:.4f}")
    return 0


def _cmd_models(args) -> int:
    from .models.prepare import prepare_cli, prepared_label
    from .models.registry import load_registry

    if args.action == "add":
        from .models.add import add_cli

        return add_cli(args)
    if args.action == "list":
        for name, spec in load_registry().items():
            print(f"{name:28s} {spec.model_set:8s} {spec.kind:9s} {spec.backend:9s} tp={spec.tp} {spec.template:10s} "
                  f"{spec.id} {prepared_label(spec)}".rstrip())
        return 0
    return prepare_cli(args.names)


def _cmd_reference(args, rest: list[str]) -> int:
    if args.what != "il":
        raise BayesflipError(f"unknown reference {args.what!r} (allowed: il)")
    from .reference_chains import main as il_main

    return il_main(rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bayesflip", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("score", help="score choices after a prompt")
    s.add_argument("--model", required=True)
    s.add_argument("--prompt", required=True)
    s.add_argument("--choice", action="append", required=True, help="repeat for each choice (keep the leading space)")
    s.add_argument("--chat", action="store_true", help="render the chat template; the prompt is the assistant prefill")
    s.add_argument("--user", default=None, help="user message for --chat")
    s.add_argument("--terminator", default="", help="appended to every choice (for choices that prefix each other)")
    s.add_argument("--device", default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_score)

    m = sub.add_parser("models", help="list, prepare (cache) or add registry models")
    ms = m.add_subparsers(dest="action", required=True)
    ms.add_parser("list", help="every registry model: set, kind, backend, tp, template, id, pinned sha")
    a = ms.add_parser("prepare", help="download Hub models into the Hub cache and pin their commit (needs internet)")
    a.add_argument("names", nargs="*", help="model names, set names or MODEL_TYPE expressions (paper:std)")
    a = ms.add_parser("add", help="write a registry entry for a Hub model or a local directory, filled from its "
                                  "config (reads the Hub cache / the directory; the network only with --hub)")
    a.add_argument("model", help="a Hub id (Qwen/Qwen2.5-0.5B) or a local model directory")
    a.add_argument("--name", default=None, help="registry name (default: the id's last part, lower case)")
    a.add_argument("--kind", default=None, choices=["base", "std", "instruct"],
                   help="base (= std) or instruct (default: from the chat template and the name; required when "
                        "the model's files are not here)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (> 1: DeepSpeed, one task per rank)")
    a.add_argument("--set", default="user", help="model set = file configs/models/<set>.yaml (default user)")
    a.add_argument("--revision", default="main", help="Hub branch, tag or commit (default main)")
    a.add_argument("--template", default=None, help="job template (default gpu-small; with --tp: a GPU template "
                                                     "with tp tasks)")
    a.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the config's")
    a.add_argument("--params-b", type=float, default=None, help="billions of parameters (default: counted)")
    a.add_argument("--hub", action="store_true", help="read the config files (a few kB, no weights) from the Hub "
                                                      "when the model is not in the Hub cache")
    m.set_defaults(func=_cmd_models)

    r = sub.add_parser("reference", help="exact Bayesian references (il: iterated-learning chains)")
    r.add_argument("what")
    r.set_defaults(func=None)

    from . import commands  # experiment / hpc / reduce commands
    commands.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not (args.cmd == "models" and (args.action == "prepare" or getattr(args, "hub", False))):
        # offline by default: only `models prepare` and `models add --hub` may reach the Hub; everything else
        # reads prepared snapshots (an unprepared Hub model is the one-line `models prepare` error, not retries)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        check_environment()    # a bad BAYESFLIP_* value: one line before anything is imported or written
        if args.cmd == "reference":
            return _cmd_reference(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return int(args.func(args) or 0)
    except Interrupted as e:          # Ctrl-C inside a command that can say how far it got
        print(f"bayesflip: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:         # Ctrl-C anywhere else: one line, the shell's 128 + SIGINT
        print("bayesflip: interrupted", file=sys.stderr)
        return 130
    except BayesflipError as e:
        msg = str(e)
        print(f"bayesflip: error: {' '.join(msg.split()) if chr(10) in msg else msg}", file=sys.stderr)
        return 2
    except OSError as e:   # disk full, permissions, ...: one line naming the path, never a traceback chain
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"bayesflip: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
