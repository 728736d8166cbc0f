"""Benchmark: reference per-sample prototype loop vs lupnl's vectorised update, at the LUPerson-NL scale.

Run by hand from the repo root (not collected by pytest):  python -m tests.bench_prototypes [--classes 430000 ...]
Both functions run side by side in this process on the same inputs, interleaved, best of --repeats runs each;
the result is checked for equality, printed, and drawn to images/models_prototype_update_bench.png.
"""
import argparse
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lupnl.pnl import update_prototypes_, update_prototypes_loop_

REPO = Path(__file__).resolve().parents[1]


def time_once(fn, P0, feats, labels, m):
    "(wall seconds, CPU seconds of this process, result) of one update on a fresh copy of the prototypes."
    P = P0.clone()
    if P.is_cuda: torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    fn(P, feats, labels, m)
    if P.is_cuda: torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c, P


def bench(classes, batch, dim, repeats, ids_in_batch, m=0.999, device="cpu", seed=0):
    "Best-of-`repeats` wall and CPU seconds of the loop and the vectorised update for one label scenario, max |difference|, distinct labels."
    g = torch.Generator().manual_seed(seed)
    P0 = F.normalize(torch.randn(classes, dim, generator=g), dim=1).to(device)
    feats = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device)
    pool = torch.randperm(classes, generator=g)[:ids_in_batch] if ids_in_batch else None
    labels = (torch.randint(0, classes, (batch,), generator=g) if pool is None
              else pool[torch.randint(0, len(pool), (batch,), generator=g)]).to(device)
    best = {k: float("inf") for k in ("loop", "vectorised", "loop_cpu", "vectorised_cpu")}
    for _ in range(repeats):  # interleaved so both see the same machine load
        for name, fn in (("loop", update_prototypes_loop_), ("vectorised", update_prototypes_)):
            t, c, P = time_once(fn, P0, feats, labels, m)
            best[name], best[name + "_cpu"] = min(best[name], t), min(best[name + "_cpu"], c)
            if name == "loop": P_loop = P
    diff = (P_loop - P).abs().max().item()
    return best, diff, len(labels.unique())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=430_000)
    ap.add_argument("--batch", type=int, default=1536)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plot", default=None, help="save the bar chart here (the README's figure: bash images/make.sh --all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, load average {load:.1f} (the machine may be shared: best of {args.repeats})")
    scenarios = {"random labels": 0, f"{args.batch // 16} ids x 16": args.batch // 16}
    rows = []
    for name, ids in scenarios.items():
        best, diff, n_ids = bench(args.classes, args.batch, args.dim, args.repeats, ids, device=args.device)
        ratio = best["loop"] / best["vectorised"]
        rows.append((name, best, ratio))
        print(f"{name:>16} ({n_ids:4d} distinct): loop {1e3 * best['loop']:8.2f} ms | vectorised "
              f"{1e3 * best['vectorised']:6.3f} ms | x{ratio:5.0f} wall | CPU time: {1e3 * best['loop_cpu']:8.2f} vs "
              f"{1e3 * best['vectorised_cpu']:6.3f} ms, x{best['loop_cpu'] / best['vectorised_cpu']:5.0f} | "
              f"max |diff| {diff:.1e}")
        assert diff < 1e-5, f"vectorised update differs from the loop by {diff}"
    if args.plot:
        import matplotlib; matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = [r[0] for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [1e3 * r[1]["loop"] for r in rows], 0.4, label="reference loop + full renorm")
        ax.bar([i + 0.2 for i in x], [1e3 * r[1]["vectorised"] for r in rows], 0.4, label="vectorised (lupnl)")
        for i, r in enumerate(rows):
            cpu_ratio = r[1]["loop_cpu"] / r[1]["vectorised_cpu"]
            ax.text(i + 0.2, 1e3 * r[1]["vectorised"], f"x{r[2]:.0f} wall\nx{cpu_ratio:.0f} CPU time", ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(list(x), names); ax.set_yscale("log"); ax.set_ylabel("ms per update (best of %d)" % args.repeats)
        ax.set_title(f"Prototype update: batch {args.batch}, {args.classes:,} ids, {args.dim}-d, "
                     f"{args.device.upper()} {args.threads} thread, shared machine (load {load:.0f})", fontsize=9)
        ax.legend(fontsize=8); fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print("saved", args.plot)


if __name__ == "__main__":
    main()
