"""Sub-commands for experiments, HPC, reduce, demo and bench.

Each command is a thin parser over a library function, so tests call the functions and
users call the same code through ``make``.
"""

from __future__ import annotations

import argparse

from .errors import BayesflipError, Interrupted


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


def _refuse_busy_overwrite(sweep, args) -> None:
    """--overwrite deletes stores: never while a job or process of the sweep still works on them."""
    if not args.overwrite:
        return
    from pathlib import Path

    from .errors import ConfigError
    from .hpc.launch import active_jobs
    from .paths import RESULTS_DIR
    from .plan import plan_sweep

    root = Path(args.results_dir or RESULTS_DIR)
    busy = active_jobs(sweep.name, root, plan_sweep(sweep, overwrite=True, results_dir=root, create=False))
    if busy:
        raise ConfigError("--overwrite", f"{len(busy)} job(s)/process(es) of sweep {sweep.name} are still active "
                          f"({'; '.join(busy[:5])}); wait for them or stop them first")


def cmd_plan(args) -> int:
    if args.dry_run:       # writes nothing: the cost table (bayesflip.cost)
        from .cost import dry_run

        dry_run(args.sweep, args.model_type, results_dir=args.results_dir, template=args.template,
                shards_per_task=args.shards_per_task, target_task_min=args.target_task_min, time_min=args.time,
                as_json=args.json, overwrite=args.overwrite)
        return 0
    _require_prepared(args)
    from .config import load_sweep
    from .plan import plan_sweep, write_manifest

    sweep = load_sweep(args.sweep, args.model_type)
    _refuse_busy_overwrite(sweep, args)
    units = plan_sweep(sweep, overwrite=args.overwrite, results_dir=args.results_dir)
    for u in units:
        print(f"{u.experiment.name:20s} {u.model.name:28s} shards {u.n_shards:5d} pending {len(u.pending):5d}  {u.store}")
    write_manifest(sweep, units, results_dir=args.results_dir)
    return 0


def cmd_debug(args) -> int:
    """Plan, then run every pending shard in this process (local GPU or CPU): the job code path, no SLURM."""
    _require_prepared(args)
    from .config import load_sweep
    from .job import run_task
    from .plan import make_tasks, plan_sweep, write_manifest

    sweep = load_sweep(args.sweep, args.model_type)
    _refuse_busy_overwrite(sweep, args)
    units = plan_sweep(sweep, overwrite=args.overwrite, results_dir=args.results_dir)
    write_manifest(sweep, units, {"mode": "debug"}, results_dir=args.results_dir)
    try:
        return _run_debug(args, sweep, units, run_task, make_tasks)
    except KeyboardInterrupt:
        line = f"interrupted; {_done_line(units)}, resume with `{_resume_command(args)}`"
    raise Interrupted(line)   # outside the except block: the run's frames (its progress bar) are let go first


def _resume_command(args) -> str:
    """The command that resumes an interrupted debug / demo run (done shards are kept and skipped)."""
    if getattr(args, "resume", None):
        return args.resume
    cmd = f"bayesflip debug --exp {args.sweep}"
    if args.model_type:
        cmd += f" --model-type {args.model_type}"
    if args.results_dir:
        cmd += f" --results-dir {args.results_dir}"
    return cmd


def _done_line(units) -> str:
    """"N/M shards done" over the units' stores, read back after an interrupt (records only, no checksums)."""
    from .store import ResultStore

    total = sum(u.n_shards for u in units)
    try:
        done = sum(sum(1 for ss in ResultStore(u.store).shard_states(verify=False).values() if ss.state == "done")
                   for u in units)
    except (BayesflipError, OSError) as e:   # the count is a courtesy: say why it is missing
        return f"? of {total} shards done ({e})"
    return f"{done}/{total} shards done"


def _run_debug(args, sweep, units, run_task, make_tasks) -> int:
    failed = 0
    tasks = make_tasks(sweep.name, units, shards_per_task=10**9)
    total = sum(u.n_shards for u in units)
    n_held = sum(len(u.held) for u in units)
    if not tasks:
        print(f"{sweep.name}: nothing to do, all {total} shards of {len(units)} stores are done"
              + (f" or held by another live run ({n_held})" if n_held else "") + " (--overwrite recomputes)")
    for task in tasks:
        r = run_task(task.sweep, task.model, task.work, device=args.device, results_dir=args.results_dir)
        held = sum(len(u.held) for u in units if u.model.name == task.model) + len(r.held)
        already = sum(u.n_shards - len(u.pending) - len(u.held) for u in units if u.model.name == task.model) \
            + len(r.skipped)
        print(f"{task.model}: {len(r.done)} shards done, {already} already done, {len(r.failed)} failed"
              + (f", {held} held by another live run (not computed here)" if held else "")
              + f" ({r.seconds:.1f} s, model load {r.load_seconds:.1f} s)")
        if getattr(args, "verbose_shards", False):      # demo passes its own Namespace
            for exp, shard in r.done:
                print(f"  computed {exp}:{shard}")
        for exp, shard, err in r.failed:
            print(f"  FAILED {exp}:{shard}: {err}")
        failed += len(r.failed)
    return 1 if failed else 0


def cmd_submit(args) -> int:
    if not args.dry_run:    # a dry run costs unprepared Hub models with the proxy tokenizer (marked *)
        _require_prepared(args)
    from .hpc.launch import submit_cli

    return submit_cli(args)


def cmd_resubmit(args) -> int:
    from .hpc.launch import resubmit_cli

    return resubmit_cli(args)


def cmd_status(args) -> int:
    from .hpc.status import status_cli

    return status_cli(args)


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
    from .demo import demo_cli

    return demo_cli(args)


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
