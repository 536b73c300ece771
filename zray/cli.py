"""The `zray` command."""

from __future__ import annotations

import argparse
import json
import platform
import sys

from zray.config import Config
from zray.errors import ZrayError


def _cmd_fit(args: argparse.Namespace) -> int:
    from zray.fit import fit

    result = fit(
        config=Config.load(args.config),
        num_workers=args.workers,
        max_steps=args.steps,
        address=args.address,
    )
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
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except ZrayError as e:
        print(f"zray {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
