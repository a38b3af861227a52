"""trainctl.contract: what the supervisor and the worker share. Standard library only (numpy in `folders`).

The dependency rule, visible in the tree::

    trainctl.supervisor ──▶ trainctl.contract ◀── trainctl.worker

The supervisor imports nothing of ours but the contract, and never torch; the worker never imports the
supervisor. `tests/test_imports.py` checks all three at runtime (a running supervisor maps no torch
library). What lives here: the process contract (`protocol`: start, signals, heartbeat, every exit
code), the run folder (`runfolder`: file names, checkpoint naming), the lifecycle (`lifecycle`: states,
journal events, kill reasons), the records people read (`records`: state.json, `status --json`), the
config schema and its rules, the data-folder scan, the one atomic writer, and the fault-injection spec.
"""
