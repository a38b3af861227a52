"""Every benchmark in one run, then one table of results against their targets.

    python bench/run_all.py            # the settings bench/RESULTS.md reports (~50 min on 2 cores)
    python bench/run_all.py --quick    # fewer repeats, shorter goodput runs (~12 min): a smoke test

Each benchmark also runs alone: python bench/<name>.py --help.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import checkpoint  # noqa: E402
import data_path  # noqa: E402
import goodput  # noqa: E402
import group_throughput  # noqa: E402
import peak_rss  # noqa: E402
import recovery  # noqa: E402
import supervisor_cost  # noqa: E402
import throughput  # noqa: E402
from common import machine  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    q = args.quick
    rows = []

    def row(what, value, target, ok):
        rows.append((what, value, target, "yes" if ok else "NO"))

    d = data_path.main(["--repeats", "1" if q else "5", "--passes", "1" if q else "3"])
    ratio = d["interleaved"]["ratio"]
    row("data path: images per CPU-second vs timm (interleaved, one process)", f"{ratio:.2f}x", ">= 2.0x", ratio >= 2.0)
    row("data path: the same, separate processes (ratio of medians)", f"{d['ratio_per_core']:.2f}x", "(cross-check)", True)
    row("data path: peak RSS vs timm", f"{d['ratio_rss']:.2f}x", "<= 1.0x", d["ratio_rss"] <= 1.0)
    t = throughput.main(["--repeats", "1" if q else "3"])
    row("training: supervised vs plain timm loop", f"{t['supervised_vs_plain']:.2f}x", ">= 1.0x", t["supervised_vs_plain"] >= 1.0)
    row("training: supervised vs worker direct", f"{t['supervised_vs_direct']:.3f}x", ">= 0.98x",
        t["supervised_vs_direct"] >= 0.98)
    k = group_throughput.main(["--repeats", "1" if q else "3"])
    row("group rung: 2 Gloo processes vs 1 process, same cores", f"{k['group_vs_one']:.2f}x", "(reported)", True)
    row("group rung: supervised vs the same torchrun command", f"{k['supervised_vs_torchrun']:.3f}x", ">= 0.98x",
        k["supervised_vs_torchrun"] >= 0.98)
    c = checkpoint.main(["--repeats", "1" if q else "5"])
    row("checkpoint: blocked vs sync save", f"{c['blocked_ratio']:.1%}", "<= 10%", c["blocked_ratio"] <= 0.10)
    row("checkpoint: commit vs disk fsync speed (writer alone)", f"{c['alone_commit_share_of_disk']:.0%}", ">= 50%",
        c["alone_commit_share_of_disk"] >= 0.5)
    row("checkpoint: commit vs disk, beside training on the same cores", f"{c['commit_share_of_disk']:.0%}", "(reported)", True)
    r = recovery.main(["--kills", "2" if q else "5"])
    row("recovery after SIGKILL (warm standby)", f"{r['warm']['total']:.2f} s", "<= 2 s", r["warm"]["total"] <= 2.0)
    row("recovery after SIGKILL (cold)", f"{r['cold']['total']:.2f} s", "(reported)", True)
    g60 = goodput.main(["--every", "60", "--minutes", "3" if q else "10"])
    row("goodput, SIGKILL every 60 s", f"{g60['goodput']:.1%}", ">= 90%", g60["goodput"] >= 0.90)
    g300 = goodput.main(["--every", "300", "--minutes", "6" if q else "15"])
    row("goodput, SIGKILL every 300 s", f"{g300['goodput']:.1%}", ">= 97%", g300["goodput"] >= 0.97)
    s = supervisor_cost.main(["--seconds", "30" if q else "120"])
    row("supervisor CPU", f"{s['cpu_share']:.2%} of a core", "<= 1%", s["cpu_share"] <= 0.01)
    row("supervisor RSS (peak)", f"{s['peak_rss'] / 2**20:.1f} MiB", "<= 60 MB", s["peak_rss"] <= 60e6)
    if not q:
        m = peak_rss.main([])
        for batch, res in m.items():
            ratio = res["trainctl async_write=true"] / res["plain timm loop"]
            row(f"EVA02-Base peak RSS, batch {batch}", f"{ratio:.2f}x timm", "<= 1.0x", ratio <= 1.0)
    print(f"\n## Summary ({machine()})\n")
    print("| measure | result | target | met |\n| --- | --- | --- | --- |")
    for r_ in rows:
        print("| " + " | ".join(r_) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
