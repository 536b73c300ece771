"""The `zray` command."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from zray.config import Config
from zray.errors import ZrayError

# `--dtype` spellings of `zray checkpoint consolidate`, as torch dtype attribute names.
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _cmd_fit(args: argparse.Namespace) -> int:
    from zray.fit import fit

    config = Config.load(args.config)
    try:
        result = fit(
            config=config, num_workers=args.workers, max_steps=args.steps, address=args.address
        )
    except KeyboardInterrupt:
        # fit() has already shut the workers down (its finally); nothing committed is lost.
        where = _latest_checkpoint(config.zray.checkpoint_dir)
        resume = (
            f"the last committed checkpoint is {where}: running the same command resumes from it"
            if where
            else "no checkpoint was committed (zray.checkpoint_dir and checkpoint_interval set one)"
        )
        print(f"zray fit: interrupted; workers stopped; {resume}", file=sys.stderr)
        return 130
    print(
        json.dumps(
            {
                "steps": result.steps,
                "world_size": result.world_size,
                "final_loss": result.final_loss,
                "tokens_per_s": result.tokens_per_s,
                "checkpoint": result.checkpoint,
                "restarts": result.restarts,
            }
        )
    )
    return 0


def _latest_checkpoint(root: str | None) -> str | None:
    if not root:
        return None
    from zray.checkpoint.reader import latest_valid

    found = latest_valid(root)
    return None if found is None else str(found)


def _cmd_report(args: argparse.Namespace) -> int:
    import torch

    from zray import __version__
    from zray.ops import kernel_report

    info = {
        "zray": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "kernels": kernel_report(),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    print(json.dumps(info, indent=2, default=str))
    return 0


def _resolve_step_dir(path: str, *, verified: bool) -> Path:
    """`path` itself when it is a step dir; for a checkpoint root, the step dir to use.

    verified=True picks what `Engine.load_checkpoint` would load: the newest committed step
    whose files all verify (skipped ones are reported as CheckpointWarnings on stderr; cost: one
    read of the chosen checkpoint). verified=False picks the newest committed step without
    reading it, or failing that the highest uncommitted one: `inspect` is for finding out what
    is wrong with it, so it must not pass over a broken checkpoint silently.
    """
    from zray.checkpoint.format import (
        COMMITTED,
        MANIFEST,
        CheckpointFormatError,
        committed_dirs,
        parse_step_dir_name,
        piece_name,
    )
    from zray.checkpoint.reader import latest_valid

    d = Path(path)
    if not d.is_dir():
        raise ValueError(
            f"DIR: {path!r} is not a directory; allowed: a step dir or a checkpoint root"
        )
    if parse_step_dir_name(d.name) is not None or any(
        (d / f).exists() for f in (COMMITTED, MANIFEST, piece_name(0))
    ):
        return d
    if verified:
        found = latest_valid(d)
        if found is None:
            raise CheckpointFormatError(
                f"{d}: no committed checkpoint whose files verify (looked for step_* dirs with a "
                "COMMITTED marker)"
            )
        return found
    committed = committed_dirs(d)
    if committed:
        return committed[0][2]
    steps = sorted(
        (s, c) for c in d.iterdir() if c.is_dir() and (s := parse_step_dir_name(c.name)) is not None
    )
    if not steps:
        raise CheckpointFormatError(
            f"{d}: no step_* dirs; allowed: a step dir (step_00000100) or the root holding them"
        )
    return steps[-1][1]


def _cmd_checkpoint_inspect(args: argparse.Namespace) -> int:
    from zray.checkpoint.consolidate import inspect

    info = inspect(_resolve_step_dir(args.dir, verified=False))
    print(json.dumps(info, indent=2))
    if info["problems"]:
        # One line for people and scripts; every problem is in the JSON above.
        first = str(info["problems"][0]).splitlines()[0]
        more = len(info["problems"]) - 1
        tail = f" (and {more} more problems; see the JSON)" if more else ""
        print(f"zray checkpoint inspect: {first}{tail}", file=sys.stderr)
        return 1
    return 0


def _cmd_checkpoint_consolidate(args: argparse.Namespace) -> int:
    import torch

    from zray.checkpoint.consolidate import consolidate
    from zray.checkpoint.format import parse_step_dir_name

    step_dir = _resolve_step_dir(args.dir, verified=True)
    out = consolidate(
        step_dir, args.out, getattr(torch, _DTYPES[args.dtype]), args.format, key=args.key
    )
    summary = {
        "path": str(out),
        "source": str(step_dir),
        "step": parse_step_dir_name(step_dir.name),
        "key": args.key,
        "dtype": args.dtype,
        "format": args.format,
        "bytes": out.stat().st_size,
    }
    print(json.dumps(summary))
    return 0


def _cmd_checkpoint_reshard(args: argparse.Namespace) -> int:
    from zray.checkpoint.format import parse_step_dir_name
    from zray.checkpoint.reshard import reshard

    step_dir = _resolve_step_dir(args.dir, verified=True)
    out = reshard(step_dir, args.out_root, args.world_size)
    summary = {
        "path": str(out),
        "source": str(step_dir),
        "step": parse_step_dir_name(out.name),
        "world_size": args.world_size,
        "files": [
            {"name": f.name, "bytes": f.stat().st_size}
            for f in sorted(out.iterdir())
            if f.suffix == ".safetensors"
        ],
    }
    print(json.dumps(summary))
    return 0


def _checkpoint_errors(
    fn: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Exit codes of `zray checkpoint`: 1 for a checkpoint that is broken (missing file, checksum
    mismatch, incomplete save), 2 for a bad argument; both as one message naming the file."""

    def run(args: argparse.Namespace) -> int:
        from zray.checkpoint.format import CheckpointFormatError

        try:
            return fn(args)
        except CheckpointFormatError as e:
            print(f"zray checkpoint {args.action}: {e}", file=sys.stderr)
            return 1
        except ValueError as e:
            print(f"zray checkpoint {args.action}: {e}", file=sys.stderr)
            return 2

    return run


def _cmd_submit(args: argparse.Namespace) -> int:
    from zray.submit import DEFAULT_EXCLUDES, submit

    entrypoint = list(args.entrypoint)
    if entrypoint[:1] == ["--"]:
        entrypoint = entrypoint[1:]  # argparse keeps the separator in a REMAINDER
    try:
        outcome = submit(
            entrypoint,
            address=args.address,
            working_dir=None if args.no_working_dir else args.working_dir,
            wait=not args.no_wait,
            excludes=[*DEFAULT_EXCLUDES, *args.exclude],
        )
    except KeyboardInterrupt:
        return 130  # submit() has said how to stop the job, which keeps running
    # 0: SUCCEEDED (or submitted, with --no-wait); 1: the job ran and did not succeed.
    # (2, from main: the job could not be submitted.)
    return 0 if outcome.status is None or outcome.succeeded else 1


def _add_checkpoint_parser(sub: argparse._SubParsersAction) -> None:
    ckpt = sub.add_parser("checkpoint", help="inspect, consolidate or reshard a saved checkpoint")
    actions = ckpt.add_subparsers(dest="action", required=True)
    dir_help = (
        "a step dir (step_00000100), or a checkpoint root: its newest committed step that "
        "verifies (the one Engine.load_checkpoint would load)"
    )

    inspect = actions.add_parser(
        "inspect",
        help="summary as JSON; exit 1 naming the file when a checksum fails",
    )
    inspect.add_argument(
        "dir",
        help="a step dir, or a checkpoint root: its newest committed step (checked, not skipped "
        "when broken)",
    )
    inspect.set_defaults(fn=_checkpoint_errors(_cmd_checkpoint_inspect))

    cons = actions.add_parser("consolidate", help="write the full weights to one file")
    cons.add_argument("dir", help=dir_help)
    cons.add_argument("out", help="output file (written atomically)")
    cons.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="cast to (fp32)")
    cons.add_argument(
        "--format", choices=("safetensors", "torch"), default="safetensors", help="(safetensors)"
    )
    cons.add_argument(
        "--key",
        default="master",
        help="saved tensor to write: master (weights, the default) or an optimizer state such "
        "as exp_avg",
    )
    cons.set_defaults(fn=_checkpoint_errors(_cmd_checkpoint_consolidate))

    resh = actions.add_parser(
        "reshard",
        help="rewrite as N even shards (for parallel reads or smaller files; loading "
        "reshards anyway)",
    )
    resh.add_argument("dir", help=dir_help)
    resh.add_argument(
        "out_root",
        help="root to write the same step into, committed (it becomes the root's newest "
        "checkpoint); its step dir must not exist yet",
    )
    resh.add_argument("--world-size", type=int, required=True, help="number of shards")
    resh.set_defaults(fn=_checkpoint_errors(_cmd_checkpoint_reshard))


def _add_submit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="run a command on a Ray cluster as a Ray Job and follow it",
        description="Run ENTRYPOINT on a Ray cluster as a Ray Job, print its output, and exit "
        "0 if it SUCCEEDED, 1 if it did not, 2 if it could not be submitted. Example: "
        "zray submit --address http://head:8265 -- zray fit config.json",
    )
    p.add_argument(
        "--address",
        default=None,
        help="the head's dashboard URL or ray://HOST:10001 (default: RAY_ADDRESS if set, else "
        "http://127.0.0.1:8265)",
    )
    p.add_argument(
        "--working-dir",
        default=".",
        help="uploaded as the job's working directory (default: the current one), minus .git, "
        "build/, .whl/, *.whl, __pycache__/, checkpoints/, zray step_* dirs and .gitignore'd files",
    )
    p.add_argument("--no-working-dir", action="store_true", help="upload nothing")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also leave this gitignore-style pattern out of the upload (repeatable)",
    )
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(fn=_cmd_submit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train the run a config describes")
    fit.add_argument("config", help="JSON or YAML: DeepSpeed keys plus a 'zray' run section")
    fit.add_argument("--workers", type=int, default=None, help="override zray.num_workers")
    fit.add_argument("--steps", type=int, default=None, help="override zray.max_steps")
    fit.add_argument(
        "--address",
        default=None,
        help="join this Ray cluster (default: start an embedded local one)",
    )
    fit.set_defaults(fn=_cmd_fit)
    report = sub.add_parser("report", help="environment, devices and compiled kernels")
    report.set_defaults(fn=_cmd_report)
    _add_checkpoint_parser(sub)
    _add_submit_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "submit" and args.entrypoint in ([], ["--"]):
        parser.error("submit: no command given; usage: zray submit [OPTIONS] -- COMMAND [ARGS...]")
    try:
        return int(args.fn(args))
    except ZrayError as e:
        print(f"zray {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
