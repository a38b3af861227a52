"""A group rung's training throughput (issue 19): K data-parallel processes (Gloo on the CPU) vs one process with
the same effective batch, and what trainctl's supervision costs a group vs the same torchrun command run directly.

    python bench/group_throughput.py [--nproc 2] [--model mobilenetv3_small_100] [--batch 16] [--steps 25]
                                     [--threads 2] [--repeats 3] [--skip 3] [--device cpu] [--photos N]

Variants, alternated and repeated (steady-state images/s from the step timestamps rank 0 writes, the first
`--skip` steps left out; the same photos, model and effective batch `--batch` in all):
- one process, supervised: the rung `batch_size = batch` on `threads` threads;
- K processes, supervised: `nproc_per_node = K`, `batch_size = batch / K`, `threads / K` threads each;
- K processes, torchrun directly: `python -m torch.distributed.run` with the arguments trainctl's agent passes it
  (worker/group.torchrun_args), no supervisor, no trainctl agent.
On a CPU the K processes share the same cores: the ratio says what splitting them costs there, not what K GPUs give.
With `--device cuda` (a machine with K GPUs or more; not yet run on one) each process trains on a GPU of its own
over NCCL: the ratio is then K GPUs vs one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, alternated, machine, medians, photos, subset  # noqa: E402
from throughput import SKIP, trainctl_run  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=2, help="processes of the group rung (K)")
    p.add_argument("--model", default="mobilenetv3_small_100")
    p.add_argument("--batch", type=int, default=16, help="effective batch (images per optimizer step)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (K processes share them)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", type=int, default=SKIP, help="first steps left out")
    p.add_argument("--photos", type=int, default=0, help="photos cycled through (default: steps x batch, one epoch)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu: Gloo; cuda: one GPU per process")
    args = p.parse_args(argv)
    if args.batch % args.nproc:
        p.error(f"--batch {args.batch} is not divisible by --nproc {args.nproc}")
    args.workers = 0
    args.photos = args.photos or args.steps * args.batch
    started = time.monotonic()
    folder = subset(photos(OUT / "photos", args.photos), args.photos)
    print(f"  photos ready after {time.monotonic() - started:.0f} s", flush=True)
    k = args.nproc
    one, group, direct = "1 process, supervised", f"{k} processes, supervised", f"{k} processes, torchrun directly"
    runs = alternated({one: lambda: trainctl_run(args, folder, "supervised"),
                       group: lambda: trainctl_run(args, folder, "supervised", nproc=k),
                       direct: lambda: trainctl_run(args, folder, "torchrun", nproc=k)}, args.repeats, "images/s")
    result = medians(runs, f"group throughput, {args.model}, effective batch {args.batch}, {args.threads} threads in "
                           f"all, {'cpu/gloo' if args.device == 'cpu' else 'cuda/nccl'}, photos ({machine()}), "
                           f"median of {args.repeats}:")
    result["group_vs_one"] = result[group] / result[one]
    result["supervised_vs_torchrun"] = result[group] / result[direct]
    print(f"  {k} processes / 1 process: {result['group_vs_one']:.2f}x (reported: the same cores, split); "
          f"supervised / torchrun directly: {result['supervised_vs_torchrun']:.3f}x (target >= 0.98)")
    return result


if __name__ == "__main__":
    main()
