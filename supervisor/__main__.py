"""``python -m trainctl.supervisor --run-dir DIR [--rung N] [--fresh-budget]``: supervise one run
(what `trainctl start` and `trainctl resume` detach). Exit codes: `trainctl.contract.protocol.ExitCode`."""
import argparse
import sys
import traceback
from pathlib import Path

from trainctl.contract.config import ConfigError
from trainctl.contract.protocol import ExitCode

from .runstate import AlreadyRunning
from .supervise import serve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainctl.supervisor")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--rung", type=int, default=None, help="start on this rung (1 = first)")
    parser.add_argument("--fresh-budget", action="store_true",
                        help="a person resumed: earlier failed attempts no longer count toward the restart budget")
    args = parser.parse_args(argv)
    try:
        return serve(args.run_dir.resolve(), None if args.rung is None else args.rung - 1, args.fresh_budget)
    except ConfigError as e:
        print(f"trainctl supervisor: {e}", file=sys.stderr, flush=True)
        return ExitCode.BAD_CONFIG
    except AlreadyRunning as e:
        print(f"trainctl supervisor: {e}", file=sys.stderr, flush=True)
        return ExitCode.RUNNING
    except Exception:   # noqa: BLE001 — e.g. the run folder unreadable: restart us, do not call the run failed
        print(f"trainctl supervisor: internal error:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return ExitCode.INTERNAL_ERROR


sys.exit(main())
