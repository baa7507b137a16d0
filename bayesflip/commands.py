"""Sub-commands for experiments, HPC, reduce, demo and bench.

Each command is a thin parser over a library function, so tests call the functions and
users call the same code through ``make``. The argparse ``Namespace`` stops here: the
library functions take plain arguments (``debug`` and ``demo`` both run
:func:`bayesflip.job.run_local`; ``submit``/``resubmit`` :mod:`bayesflip.hpc.launch`).
"""

from __future__ import annotations

import argparse

from .errors import Interrupted


def _sweep_args(p: argparse.ArgumentParser, sweep_flag: str = "--exp") -> None:
    p.add_argument(sweep_flag, dest="sweep", required=True, help="a sweep (configs/sweeps) or an experiment name")
    p.add_argument("--model-type", default=None, help="std | instruct | local | all | a set or model name")
    p.add_argument("--overwrite", action="store_true", help="recompute: delete the stores first")
    p.add_argument("--results-dir", default=None)


def _require_prepared(args) -> None:
    """The sweep's Hub models are prepared, checked first: no heavy import, no network; else exit 2 with
    the ``bayesflip models prepare`` line (:func:`bayesflip.models.prepare.require_prepared_models`)."""
    from .config import sweep_models
    from .models.prepare import require_prepared_models

    require_prepared_models(sweep_models(args.sweep, args.model_type))


def cmd_plan(args) -> int:
    if args.dry_run:       # writes nothing: the cost table (bayesflip.hpc.cost)
        from .hpc.launch import dry_run

        dry_run(args.sweep, args.model_type, results_dir=args.results_dir, template=args.template,
                shards_per_task=args.shards_per_task, target_task_min=args.target_task_min, time_min=args.time,
                as_json=args.json, overwrite=args.overwrite)
        return 0
    _require_prepared(args)
    from .config import load_sweep
    from .plan import plan_sweep, refuse_busy_overwrite, write_manifest

    sweep = load_sweep(args.sweep, args.model_type)
    if args.overwrite:
        refuse_busy_overwrite(sweep, args.results_dir)
    units = plan_sweep(sweep, overwrite=args.overwrite, results_dir=args.results_dir)
    for u in units:
        print(f"{u.experiment.name:20s} {u.model.name:28s} shards {u.n_shards:5d} pending {len(u.pending):5d}  {u.store}")
    write_manifest(sweep, units, results_dir=args.results_dir)
    return 0


def cmd_debug(args) -> int:
    """Plan, then run every pending shard in this process (local GPU or CPU): the job code path, no SLURM."""
    from .job import run_local

    return run_local(args.sweep, args.model_type, overwrite=args.overwrite, results_dir=args.results_dir,
                     device=args.device, list_shards=args.verbose_shards).rc


def _launch_options(args) -> dict:
    """The options ``submit`` and ``resubmit`` share (:func:`bayesflip.hpc.launch.submit_sweep`)."""
    from pathlib import Path

    return dict(results_dir=Path(args.results_dir) if args.results_dir else None, partition=args.partition,
                account=args.account, qos=args.qos, time_min=args.time, array_throttle=args.array_throttle,
                shards_per_task=args.shards_per_task, template=args.template, executor=args.executor,
                dry_run=args.dry_run, target_task_min=args.target_task_min, as_json=getattr(args, "json", False))


def cmd_submit(args) -> int:
    """``bayesflip submit --exp X --model-type T`` (``make submit``)."""
    if not args.dry_run:    # a dry run costs unprepared Hub models with the proxy tokenizer (marked *)
        _require_prepared(args)
    from .hpc.launch import submit_sweep, wait_jobs

    sub = submit_sweep(args.sweep, args.model_type, overwrite=args.overwrite, cancel_running=args.cancel_running,
                       **_launch_options(args))
    if sub.manifest:
        print(f"manifest: {sub.manifest}\nstatus:   bayesflip status --sweep {sub.sweep.name}"
              + (f" --results-dir {args.results_dir}" if args.results_dir else ""))
    if args.wait and sub.submitted:
        return 1 if wait_jobs(sub) else 0
    return 0


def cmd_resubmit(args) -> int:
    """``bayesflip resubmit --sweep X`` (``make resubmit``): only what is missing."""
    from .errors import ConfigError
    from .hpc.launch import resubmit_sweep, wait_jobs

    if args.overwrite:
        raise ConfigError("--overwrite", "resubmit never deletes results; use `submit --overwrite` to recompute")
    sub = resubmit_sweep(args.sweep, args.model_type, **_launch_options(args))
    if args.wait and sub.submitted:
        return 1 if wait_jobs(sub) else 0
    return 0


def cmd_status(args) -> int:
    """``bayesflip status --sweep X`` (``make status SWEEP=X``). Always exits 0 once the manifest is read."""
    import json
    from pathlib import Path

    from .hpc.manifest import Manifest
    from .hpc.status import render, sweep_status, to_json

    root = Path(args.results_dir) if args.results_dir else None
    st = sweep_status(Manifest.load(args.sweep, root), results_dir=root)
    print(json.dumps(to_json(st), indent=1, default=str) if args.json else render(st))
    return 0


def cmd_reduce(args) -> int:
    from .reduce import reduce_cli

    try:
        return reduce_cli(args)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the report is incomplete (the stores are untouched), re-run "
                          f"`bayesflip reduce --sweep {args.sweep}"
                          + (f" --results-dir {args.results_dir}" if getattr(args, "results_dir", None) else "")
                          + (f" --out {args.out}" if getattr(args, "out", None) else "") + "`") from None


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.sweep, overwrite=args.overwrite, results_dir=args.results_dir)


def cmd_bench(args) -> int:
    from .bench import bench_cli

    return bench_cli(args)


def cmd_prompts(args) -> int:
    from .listing import prompts_cli

    return prompts_cli(args)


def cmd_published(args) -> int:
    from .reduce.published_values import check_cli, list_cli

    return check_cli(args.check) if args.check else list_cli()


def cmd_migrate(args) -> int:
    from .migrate import migrate_sweep

    for path, what in migrate_sweep(args.sweep, args.results_dir):
        print(f"{what:9s} {path}")
    return 0


def _slurm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--time", type=int, default=None, help="minutes per task")
    p.add_argument("--array-throttle", type=int, default=None, help="max tasks running at once (%%N)")
    p.add_argument("--shards-per-task", type=int, default=None, help="fixed shards per task (no packing by time)")
    p.add_argument("--target-task-min", type=int, default=None,
                   help="pack shards into tasks of about this many minutes (template target_task_min)")
    p.add_argument("--template", default=None, help="job template(s) instead of the models' own: a name, or a "
                   "comma-separated list; each applies to the models whose tp equals its task count")
    p.add_argument("--executor", default="slurm", choices=["slurm", "local"], help="submitit backend")
    p.add_argument("--wait", action="store_true", help="wait for the jobs to finish")
    p.add_argument("--dry-run", action="store_true",
                   help="plan and print per model cells, tokens, tasks, estimated device-minutes; submit nothing")


def add_commands(sub) -> None:
    p = sub.add_parser("plan", help="validate a sweep and create its stores; prints shards "
                                    "(--dry-run: writes nothing, prints the cost per model)")
    _sweep_args(p)
    p.add_argument("--dry-run", action="store_true", help="write nothing; print per model cells, prompt and "
                   "generated tokens, tasks and estimated device-minutes (unprepared Hub models: proxy tokenizer)")
    p.add_argument("--json", action="store_true", help="with --dry-run: the table as one JSON object")
    p.add_argument("--template", default=None, help="with --dry-run: cost with this job template")
    p.add_argument("--shards-per-task", type=int, default=None, help="with --dry-run: fixed shards per task")
    p.add_argument("--target-task-min", type=int, default=None, help="with --dry-run: target minutes per task")
    p.add_argument("--time", type=int, default=None, help="with --dry-run: minutes per task (time_min)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("debug", help="run a sweep in-process (local GPU/CPU), same code as the cluster jobs")
    _sweep_args(p)
    p.add_argument("--device", default=None)
    p.add_argument("--list-shards", dest="verbose_shards", action="store_true", help="print every computed shard")
    p.set_defaults(func=cmd_debug)

    p = sub.add_parser("prompts", help="list the exact prompts (text + choices) of an experiment or sweep; tokenizers only")
    p.add_argument("--exp", dest="sweep", required=True, help="a sweep (configs/sweeps) or an experiment name")
    p.add_argument("--model", default=None, help="a model name or MODEL_TYPE (default: the sweep's models)")
    p.add_argument("--limit", type=int, default=None, help="at most N prompts per experiment x model")
    p.add_argument("--where", action="append", default=None, help="key=value filter on cell coordinates (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_prompts)

    p = sub.add_parser("submit", help="submit a sweep as SLURM job arrays (submitit)")
    _sweep_args(p)
    _slurm_args(p)
    p.add_argument("--cancel-running", action="store_true",
                   help="with --overwrite: scancel the sweep's queued/running jobs first (else refused)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("resubmit", help="submit only the shards that are not complete")
    _sweep_args(p, "--sweep")
    _slurm_args(p)
    p.set_defaults(func=cmd_resubmit)

    p = sub.add_parser("status", help="per model × experiment: shards done / running / pending / failed")
    p.add_argument("--sweep", required=True)
    p.add_argument("--results-dir", default=None)
    p.add_argument("--json", action="store_true", help="one JSON object: counts and problem shards per store")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("reduce", help="merge a sweep's stores, compare with Bayesian references, write the report")
    p.add_argument("--sweep", required=True)
    p.add_argument("--results-dir", default=None)
    p.add_argument("--out", default=None, help="output dir (default results/<sweep>/reduce)")
    p.set_defaults(func=cmd_reduce)

    p = sub.add_parser("published", help="the studies' published values and their sources "
                                         "(--check: recompute them from a checkout of the original repository)")
    p.add_argument("--check", default=None, metavar="CHECKOUT",
                   help="a checkout of rcorona/llm-coin-flips: recompute every value, exit 1 listing mismatches")
    p.set_defaults(func=cmd_published)

    p = sub.add_parser("migrate", help="rewrite a sweep's stores of the older coords/+labels/ layout in place so "
                                       "xarray reads them labelled (data chunks and records untouched)")
    p.add_argument("--sweep", required=True)
    p.add_argument("--results-dir", default=None)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("demo", help="the demo sweep end to end on smollm2-135m-instruct, then reduce + report")
    p.add_argument("--sweep", default="demo", help="a sweep on the embedded model (demo, paper_smol)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--results-dir", default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks against naive baselines")
    p.add_argument("--only", default=None, help="comma-separated benchmark names")
    p.add_argument("--out", default=None)
    p.add_argument("--model", default=None, help="registry model (default smollm2-135m-instruct)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the registry's)")
    p.set_defaults(func=cmd_bench)

    from .gpu_check import add_arguments as gpu_check_arguments, gpu_check_cli
    p = sub.add_parser("gpu-check", help="engine contract + throughput on this node's GPU (one JSON file)")
    gpu_check_arguments(p)
    p.set_defaults(func=gpu_check_cli)
