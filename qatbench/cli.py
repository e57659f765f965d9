"""`qatbench run | sweep | bench | list | leaderboard`: the command line.

Every user error is printed as one line (`qatbench: error: ...`), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from . import compare, deploy, executors, leaderboard, status
from .bench import bench, markdown
from .errors import QatbenchError, check_choice
from .distributed import init_distributed, shutdown, world_from_environment
from .harness import RunOptions, check_fsdp_processes, run_all
from .params import describe, parse_assignments
from .progress import LOG_KINDS
from .quant import parse_bits
from .registry import METHODS, TASKS, load_plugin_file
from .results import load_records, record_path
from .signals import Stopped, exit_code
from .spec import RunSpec, bind_data, resolve, resolve_device
from .sweep import expand, load_sweep, shard, shared_method_args
from .system import environment


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are QatbenchErrors (one line, no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        raise QatbenchError(f"{self.prog}: {message} (see --help)")


def _build_parser() -> argparse.ArgumentParser:
    plugins = _Parser(add_help=False)
    plugins.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                         help="load a method or task plugin file (repeatable)")
    parser = _Parser(prog="qatbench", description="Benchmark quantization-aware training methods.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    execution = _Parser(add_help=False)
    execution.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    execution.add_argument("--data-root", type=Path, default=None, help="where the data set lies (searched first)")
    execution.add_argument("--no-download", action="store_true", help="never try to download a missing data set")
    execution.add_argument("--out", type=Path, default=Path("runs"), help="folder of run records (default: runs/)")
    execution.add_argument("--force", action="store_true", help="rerun runs whose record already exists")
    execution.add_argument("--checkpoint-minutes", type=float, default=10.0, metavar="M",
                           help="checkpoint inside an epoch at most every M minutes (default: 10; every epoch "
                                "regardless; 0: after every step)")
    execution.add_argument("--keep-checkpoints", action="store_true",
                           help="keep each run's last checkpoint after its record is written")
    execution.add_argument("--log", nargs="+", default=[], metavar="KIND",
                           help="per-step logs beside each record: csv (<record>.steps.csv), tensorboard (<record>.tb/)")
    execution.add_argument("--progress-seconds", type=float, default=30.0, metavar="S",
                           help="without a terminal, a progress line every S seconds (default: 30; 0: none)")
    execution.add_argument("--stale-lock-hours", type=float, default=24.0, metavar="H",
                           help="report run locks of other hosts untouched for H hours (default: 24)")
    _add_speed_options(execution)
    execution.add_argument("--micro-batch", type=int, default=None, metavar="N",
                           help="gradient accumulation: forward and backward N samples at a time on each process; "
                                "the recipe's batch stays the step's batch (default: all at once)")
    execution.add_argument("--shard", default=None, metavar="I/N",
                           help="run only every N-th run starting at the I-th (split a sweep over N processes)")
    execution.add_argument("--nproc", type=int, default=1, metavar="N",
                           help="train each run on N processes (DDP): starts torchrun --nproc-per-node N on this "
                                "command (on CUDA, one GPU each)")
    execution.add_argument("--fsdp", action="store_true",
                           help="with several processes: shard each run's parameters, gradients and optimizer state "
                                "over them (FSDP2; llama-* tasks) instead of replicating them (DDP)")

    run = sub.add_parser("run", parents=[plugins, execution],
                         help="train and record runs (every combination of the lists)")
    run.add_argument("--method", nargs="+", required=True, help="method name(s), see `qatbench list methods`")
    run.add_argument("--task", nargs="+", required=True, help="task name(s), see `qatbench list tasks`")
    run.add_argument("--bits", nargs="+", default=None, help="bit width(s): 1..8, or T for ternary (fp ignores it)")
    run.add_argument("--seeds", nargs="+", default=["0"], help="seeds (default: 0)")
    run.add_argument("--granularity", default=None, help="channel | tensor (default: the task's)")
    run.add_argument("--quantizer", default=None, help="level set: uniform | lsbq (default: the task's)")
    run.add_argument("--recipe", default="paper", help="smoke | short | paper (default: paper)")
    run.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    run.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    run.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    run.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="a method hyper-parameter (repeatable), e.g. anneal_end=0.75")
    run.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="a task option (repeatable), e.g. hidden=64")
    run.add_argument("--init", default=None, metavar="CHECKPOINT",
                     help="start from these weights: a run's export (<record>.safetensors, e.g. of a --method fp run "
                          "of the task) or a state dict saved with torch.save")

    sweep = sub.add_parser("sweep", parents=[plugins, execution], help="run a YAML sweep file (see configs/)")
    sweep.add_argument("file", type=Path, help="the sweep file")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their record names, train nothing")
    sweep.add_argument("--executor", default="inline",
                       help="inline (this process, default) | local (a pool of --workers processes on this machine) "
                            "| slurm (one job-array task per run, submitit) | debug (submitit's, in this process)")
    sweep.add_argument("--workers", type=int, default=1, metavar="K",
                       help="local: runs at once, each pinned to its own GPU(s); more workers than GPUs share them")
    sweep.add_argument("--gpus-per-run", type=int, default=1, metavar="G",
                       help="local, slurm: devices (processes, DDP) per run (default: 1)")
    sweep.add_argument("--partition", default=None, help="slurm: the partition")
    sweep.add_argument("--time-min", type=int, default=None, metavar="T", help="slurm: each job's time limit in minutes")
    sweep.add_argument("--array-parallelism", type=int, default=256, metavar="K",
                       help="slurm: job-array tasks running at once (default: 256)")
    sweep.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="slurm: any other submitit SLURM parameter, e.g. account=ABC, qos=high (repeatable)")

    bench = sub.add_parser("bench", parents=[plugins], help="time each method's step against the FP step")
    bench.add_argument("--task", required=True, help="task name")
    bench.add_argument("--methods", nargs="+", default=None, help="methods (default: every registered one)")
    bench.add_argument("--bits", default="2", help="bit width (default: 2)")
    bench.add_argument("--granularity", default=None, help="channel | tensor (default: the task's)")
    bench.add_argument("--quantizer", default=None, help="uniform | lsbq (default: the task's)")
    bench.add_argument("--batch-size", type=int, default=None, help="override the paper recipe's batch size")
    bench.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    _add_speed_options(bench)
    bench.add_argument("--steps", type=int, default=50, help="timed steps per method per round (default: 50)")
    bench.add_argument("--warmup", type=int, default=10, help="untimed steps per method first (default: 10)")
    bench.add_argument("--rounds", type=int, default=5, help="rounds in which the methods take turns (default: 5)")
    bench.add_argument("--data-root", type=Path, default=None, help="where the data set lies (searched first)")
    bench.add_argument("--no-download", action="store_true", help="never try to download a missing data set")
    bench.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder of bench records")

    evaluate = sub.add_parser("eval", parents=[plugins], help="rebuild exported models and evaluate them")
    evaluate.add_argument("exports", nargs="+", type=Path, help="<record>.safetensors files written by runs")
    evaluate.add_argument("--data-root", type=Path, default=None, help="where the data set lies (searched first)")
    evaluate.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    evaluate.add_argument("--download", action="store_true", help="let torchvision download a missing data set")

    export = sub.add_parser("export", parents=[plugins], help="export runs from their final checkpoints")
    export.add_argument("records", nargs="+", type=Path, help="run records whose final checkpoint was kept")

    status_parser = sub.add_parser("status", parents=[plugins], help="where every run of a results folder stands")
    status_parser.add_argument("runs", type=Path, help="the results folder (--out of qatbench run/sweep)")
    status_parser.add_argument("--sweep", type=Path, action="append", default=[], metavar="FILE.yaml",
                        help="also list this sweep file's runs that never started (repeatable)")
    status_parser.add_argument("--device", default="cpu", help="the sweep's device (its runs' identity): cpu | cuda")
    status_parser.add_argument("--data-root", type=Path, default=None, help="the sweep's data (its runs' identity)")
    status_parser.add_argument("--format", default="text", help="text | csv | json (default: text)")

    lst = sub.add_parser("list", parents=[plugins], help="list methods and tasks with their options")
    lst.add_argument("what", nargs="?", default="all", help="methods | tasks | all")

    board = sub.add_parser("leaderboard", parents=[plugins], help="build markdown tables from run records")
    board.add_argument("records", nargs="+", type=Path, help="record files or folders (searched recursively)")
    board.add_argument("-o", "--out", type=Path, default=None,
                       help="write <task>.md files (and figures, README.md) here (default: print to stdout)")
    board.add_argument("--format", default="md", help="md | csv | json | latex (default: md)")

    comparison = sub.add_parser("compare", parents=[plugins],
                                help="per cell, what changed between two sets of records and whether it is significant")
    comparison.add_argument("old", type=Path, help="records before (a file or folder)")
    comparison.add_argument("new", type=Path, help="records after (a file or folder)")
    comparison.add_argument("--format", default="md", help="md | csv | json (default: md)")
    return parser


def _add_speed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", default="auto",
                        help="fp32 | bf16 (autocast) | auto: the recipe's choice on CUDA, fp32 on CPU (default)")
    parser.add_argument("--compile", nargs="?", const="default", default="none", metavar="MODE",
                        help="torch.compile the model: default | reduce-overhead (CUDA graphs) | max-autotune")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory order for conv nets")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false",
                        help="on CUDA, full fp32 matrix multiplies and no cudnn.benchmark (TF32 and autotuned "
                             "convolutions by default; the run's identity says which)")


_DEFAULT_SPEED = {"precision": "auto", "compile": "none", "channels_last": False, "tf32": True}


def _speed_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"precision": args.precision, "compile": args.compile, "channels_last": args.channels_last,
            "tf32": args.tf32}


def _with_speed_options(specs: list[RunSpec], args: argparse.Namespace) -> list[RunSpec]:
    """The command line's speed options, where given, over a sweep file's."""
    given = {k: v for k, v in _speed_options(args).items() if v != _DEFAULT_SPEED[k]}
    return [dataclasses.replace(s, **given) for s in specs]


def _specs(args: argparse.Namespace) -> list[RunSpec]:
    bits_values = [parse_bits(b) for b in args.bits] if args.bits else [None]
    method_args = shared_method_args(args.method, parse_assignments(args.method_arg, "--method-arg"))
    options = {"recipe": args.recipe, "task_args": parse_assignments(args.task_arg, "--task-arg"),
               "scheme": args.quantizer, "granularity": args.granularity, "epochs": args.epochs,
               "batch_size": args.batch_size, "lr": args.lr, "init": args.init, "device": args.device,
               **_speed_options(args)}
    return expand(args.task, method_args, bits_values, args.seeds, **options)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise QatbenchError(f"output folder {str(folder)!r} is not writable: {err.strerror or err}") from None


def _torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process by `torchrun --standalone --nproc-per-node N -m qatbench ARGV` (without --nproc)."""
    if nproc < 1:
        raise QatbenchError(f"--nproc {nproc} must be >= 1")
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            rest.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "qatbench", *rest]
    sys.stdout.flush()
    os.execv(sys.executable, command)


def _cmd_run(specs: list[RunSpec], args: argparse.Namespace, argv: list[str]) -> int:
    world = world_from_environment()
    executor = getattr(args, "executor", "inline")
    if executor != "inline" and (args.nproc != 1 or world.distributed):
        raise QatbenchError(f"--executor {executor} starts each run's processes itself: give every run N "
                            f"processes with --gpus-per-run N, not --nproc or torchrun")
    if args.nproc != 1 and not world.distributed:
        _torchrun(args.nproc, argv)
    device = init_distributed(world, args.device)
    given = {"micro_batch": args.micro_batch} if args.micro_batch is not None else {}
    given.update({"fsdp": True} if args.fsdp else {})
    specs = [dataclasses.replace(s, device=device, **given) for s in specs]
    if args.shard:
        specs = shard(specs, args.shard)
    runs = [resolve(spec) for spec in specs]  # validate everything before training anything
    for kind in args.log:
        check_choice("log kind", kind, LOG_KINDS)
    for name in ("checkpoint_minutes", "stale_lock_hours", "progress_seconds"):
        value = getattr(args, name)
        if not (value >= 0 and value != float("inf")):
            raise QatbenchError(f"--{name.replace('_', '-')} {value} must be a number >= 0")
    if getattr(args, "dry_run", False):
        try:
            bind_data(runs, args.data_root, download=False)
        except QatbenchError as err:  # a dry run may be made where the data is not
            missing = f" (run ids need the data: {err})"
        else:
            missing = ""
        for run in runs:
            print(run.label + ("" if missing else f": {run.run_id}"))
        print(f"{len(runs)} runs{missing}")
        return 0
    _check_writable(args.out)
    if executor != "inline":
        check_fsdp_processes(specs, args.gpus_per_run)
        return _execute_elsewhere(specs, args, argv)
    options = RunOptions(force=args.force, checkpoint_minutes=args.checkpoint_minutes,
                         keep_checkpoints=args.keep_checkpoints, stale_lock_s=3600 * args.stale_lock_hours,
                         log=(lambda line: print(line, flush=True)) if world.main else (lambda line: None),
                         command=shlex.join(["qatbench", *argv]), world=world, logs=tuple(args.log),
                         progress_s=args.progress_seconds)
    records = run_all(runs, args.out, args.data_root, not args.no_download, options=options)
    failed = [r for r in records if r.status != "ok"]
    skipped = len(runs) - len(records)
    held = f", {skipped} held by other processes" if skipped else ""
    ranks = f" on {world.size} processes each" if world.distributed else ""
    if world.main:
        print(f"{len(records)} runs{ranks}, {len(records) - len(failed)} ok{held}; records in {args.out}/")
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace, argv: list[str]) -> int:
    for name in ("steps", "warmup", "rounds"):
        if getattr(args, name) < 1:
            raise QatbenchError(f"--{name} {getattr(args, name)} must be >= 1")
    methods = args.methods or METHODS.names()
    specs = expand([args.task], shared_method_args(methods, parse_assignments(args.method_arg, "--method-arg")),
                   [parse_bits(args.bits)], [0], task_args=parse_assignments(args.task_arg, "--task-arg"),
                   scheme=args.quantizer, granularity=args.granularity, batch_size=args.batch_size, device=args.device,
                   **_speed_options(args))
    _check_writable(args.out)
    rows = bench(specs, args.steps, args.warmup, args.rounds, args.data_root, not args.no_download)
    table = markdown(rows)
    print(table)
    rows_out = [dataclasses.asdict(r) | {"met": r.met} for r in rows]
    record = {"command": shlex.join(["qatbench", *argv]), "task": args.task,
              "environment": environment(resolve_device(args.device)), "rows": rows_out, "markdown": table,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = args.out / f"{args.task}-{args.device.replace(':', '')}-{record['created'].replace(':', '')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"record: {path}")
    return 0


def _execute_elsewhere(specs: list[RunSpec], args: argparse.Namespace, argv: list[str]) -> int:
    """A sweep's runs on a local process pool or through submitit (SLURM, or its debug executor)."""
    check_choice("executor", args.executor, executors.EXECUTORS)
    settings = executors.Settings(out=args.out, data_root=args.data_root, download=not args.no_download,
                                  force=args.force, checkpoint_minutes=args.checkpoint_minutes,
                                  keep_checkpoints=args.keep_checkpoints, stale_lock_s=3600 * args.stale_lock_hours,
                                  command=shlex.join(["qatbench", *argv]), logs=tuple(args.log),
                                  progress_s=args.progress_seconds,
                                  plugins=tuple(str(Path(p).resolve()) for p in args.plugin))
    if args.executor == "local":
        lines = executors.run_local(specs, settings, args.workers, args.gpus_per_run)
        failed = [line for line in lines if "] ok:" not in line]
        print(f"{len(lines)} runs on {args.workers} workers, {len(lines) - len(failed)} ok; records in {args.out}/")
        return 1 if failed else 0
    parameters = {"slurm_additional_parameters": parse_assignments(args.slurm_arg, "--slurm-arg")}
    if args.executor == "slurm":
        if not args.partition or not args.time_min or args.time_min < 1:
            raise QatbenchError("--executor slurm needs --partition P and --time-min T (minutes, >= 1)")
        if args.array_parallelism < 1:
            raise QatbenchError(f"--array-parallelism {args.array_parallelism} must be >= 1")
        parameters.update(slurm_partition=args.partition, timeout_min=args.time_min,
                          slurm_array_parallelism=args.array_parallelism)
    ids = executors.submit(specs, settings, args.executor, args.gpus_per_run, parameters)
    print(f"{len(ids)} jobs submitted ({args.executor}); each run's output goes to <record>.log in {args.out}/; "
          f"qatbench status {args.out} follows them")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Exit 1 when a metric differs from its record on the run's own data and device type."""
    differs = 0
    for path in args.exports:
        result = deploy.evaluate_export(path, args.data_root, args.device, args.download)
        print(result.describe())
        differs += result.recorded is not None and not result.bitwise_equal and result.same_data \
            and result.same_device_type
    return 1 if differs else 0


def _cmd_export(args: argparse.Namespace) -> int:
    for path in args.records:
        summary = deploy.export_from_checkpoint(path)
        if "error" in summary:
            raise QatbenchError(f"{path}: {summary['error']}")
        print(f"wrote {path.with_name(summary['file'])}: {summary['packed_bytes'] / 2**20:.3f} MB packed, "
              f"{summary['ratio']:.3f} of the fp32 model")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    check_choice("format", args.format, ("text", "csv", "json"))
    if not args.runs.is_dir():
        raise QatbenchError(f"no such results folder: {args.runs}")
    expected = []
    for sweep_file in args.sweep:
        runs = bind_data([resolve(s) for s in load_sweep(sweep_file, args.device)], args.data_root, download=False)
        expected += [record_path(args.runs, r.task.name, r.method_cls.name, r.bits_text, r.spec.seed, r.run_id)
                     for r in runs]
    print(status.render(status.folder_status(args.runs, expected), args.format))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what not in ("methods", "tasks", "all"):
        from .errors import valid_choices

        raise QatbenchError(f"cannot list {args.what!r}; {valid_choices(args.what, ['methods', 'tasks', 'all'])}")
    if args.what in ("methods", "all"):
        print("Methods:")
        for name in METHODS.names():
            _print_entry(name, METHODS.get(name))
    if args.what in ("tasks", "all"):
        print("Tasks:")
        for name in TASKS.names():
            task = TASKS.get(name)
            _print_entry(name, task)
            for recipe_name, recipe in task.recipes.items():
                print(f"      recipe {recipe_name}: {recipe.summary()}")
    return 0


def _print_entry(name: str, cls: type) -> None:
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    print(f"  {name:<20} {summary}")
    for field, type_name, default, help_text in describe(cls.Config):
        print(f"      {field}: {type_name} = {default!r}  {help_text}")


def _load_with_warnings(paths: list[Path]) -> list[Any]:
    """Records from files and folders; each skipped file is one warning line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = load_records(paths)
    for w in caught:
        print(f"qatbench: warning: {w.message}", file=sys.stderr)
    return records


def _print_block(text: str) -> None:
    """Print a rendered table or file's text with exactly one newline at its end."""
    print(text, end="" if text.endswith("\n") else "\n")


def _cmd_leaderboard(args: argparse.Namespace, argv: list[str]) -> int:
    records = _load_with_warnings(args.records)
    regenerate = shlex.join(["qatbench", *argv])
    if args.out is None:
        for text in leaderboard.render(records, args.format, regenerate).values():
            _print_block(text)
        return 0
    for path in leaderboard.write(records, args.out, regenerate, fmt=args.format):
        print(f"wrote {path}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    check_choice("format", args.format, ("md", "csv", "json"))
    old, new = _load_with_warnings([args.old]), _load_with_warnings([args.new])
    if args.format == "md":
        print(compare.compare(old, new))
        return 0
    frame = compare.compare_frame(old, new)
    _print_block(frame.to_csv(index=False) if args.format == "csv" else frame.to_json(orient="records", indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _build_parser().parse_args(argv)
        for plugin in args.plugin:
            load_plugin_file(plugin)
        if args.command == "run":
            return _cmd_run(_specs(args), args, argv)
        if args.command == "sweep":
            return _cmd_run(_with_speed_options(load_sweep(args.file, args.device), args), args, argv)
        if args.command == "list":
            return _cmd_list(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "bench":
            return _cmd_bench(args, argv)
        if args.command == "compare":
            return _cmd_compare(args)
        return _cmd_leaderboard(args, argv)
    except QatbenchError as err:
        print(f"qatbench: error: {err}", file=sys.stderr)
        return 2
    except Stopped as stopped:
        print(f"qatbench: {stopped}; every finished run's record is kept", file=sys.stderr)
        return exit_code(stopped.signum)
    except KeyboardInterrupt:
        print("qatbench: interrupted; every finished run's record is kept", file=sys.stderr)
        return 130
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
