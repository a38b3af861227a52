"""``python -m trainctl.supervisor.command ...`` = ``trainctl ...``, for service files that name the interpreter."""
import sys

from .cli import main

sys.exit(main())
