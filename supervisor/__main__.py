"""``python -m trainctl.supervisor --run-dir DIR [--profile N]``: supervise one run (what `trainctl start` detaches)."""
import argparse
import sys
from pathlib import Path

from trainctl.worker.config import ConfigError

from .runstate import AlreadyRunning
from .supervise import serve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainctl.supervisor")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--profile", type=int, default=None, help="start on this rung")
    args = parser.parse_args(argv)
    try:
        return serve(args.run_dir.resolve(), args.profile)
    except (ConfigError, AlreadyRunning) as e:
        print(f"trainctl supervisor: {e}", file=sys.stderr, flush=True)
        return 2


sys.exit(main())
