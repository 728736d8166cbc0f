"""Benchmark: the PNL training step against its floor and against the reference PNL module, on CPU.

Run by hand from the repo root (not collected by pytest):

    OMP_NUM_THREADS=1 python -m tests.bench_step [--classes 1000,100000,430000 --crops 128x64,64x32 ...]

For each crop size and class count, every variant below runs `--repeats` times, interleaved round-robin so all of
them see the same machine load. The best (minimum) process CPU time of each is reported with its ratio to the floor:
with one thread, CPU time is the work done and is robust to other jobs on a shared machine (the median wall time is
kept in the JSON rows too, and the load average before and after is printed):

* floor     - the batch's query trunk forward + backward plus key trunk forward (no heads, no losses);
* floor+cls - the floor plus the classifier (bottleneck + C-way linear) and its cross-entropy: what any
              supervised step at C classes pays, whatever the method;
* lupnl     - `PNL` step, every part on (prototype loss, correction, label-guided instance loss), keys in 1 BN batch
              (as the reference on one process);
* lupnl-8   - the same with lupnl's default one-process shuffle-BN (8 key chunks);
* previous  - the same step through the frozen copy of the previous `PNL.forward` (tests/test_models.py);
* reference - LUPerson-NL's `PNL` module (DengpanFu/LUPerson-NL, PNL/libs/pnl_builder.py + encoder.py) with the same
              settings, and the losses as its lup_pnl.py computes them. Its source is read at run time from a copy
              outside this repository (--ref: a git directory as made by the `fetch` tool, or a checkout), never
              vendored. On one process its batch shuffle is a plain permutation (1 BN batch).

Settings of the issue's table: ResNet-18, batch 64, queue 4096, dim 128, projection hidden 2048, bottleneck 256.
Every variant does forward + backward (gradients zeroed, no optimizer step). One thread by default (--threads).
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from lupnl.pnl import PNL

REPO = Path(__file__).resolve().parents[1]
REF_DEFAULT = "/work/.mirror/DengpanFu+LUPerson-NL/repo"


def load_reference(ref):
    "The reference `PNL` and `MoCoEncoder` classes, imported from a temporary copy of the two files (outside the repo)."
    ref, out = Path(ref), Path(tempfile.mkdtemp(prefix="lupnl_ref_")) / "refpnl"
    out.mkdir(parents=True)
    for name in ("pnl_builder.py", "encoder.py"):
        if (ref / "PNL" / "libs" / name).is_file(): text = (ref / "PNL" / "libs" / name).read_text()
        else: text = subprocess.run(["git", f"--git-dir={ref}", "show", f"HEAD:PNL/libs/{name}"], check=True,
                                    capture_output=True, text=True).stdout
        (out / name).write_text(text)
    (out / "__init__.py").write_text("")
    sys.path.insert(0, str(out.parent))
    from refpnl.encoder import MoCoEncoder
    from refpnl.pnl_builder import PNL as RefPNL

    class RefPNLOneProcess(RefPNL):
        "The reference on one process: its DDP shuffle is a permutation of the batch (it calls .cuda() otherwise)."
        def _batch_shuffle_ddp(self, x):
            idx = torch.randperm(x.shape[0])
            return x[idx], torch.argsort(idx)
        def _batch_unshuffle_ddp(self, x, idx_unshuffle): return x[idx_unshuffle]
    return RefPNLOneProcess, MoCoEncoder


def init_single_process_group():
    "The reference gathers with torch.distributed even on one process: a gloo group of 1."
    import torch.distributed as dist
    if dist.is_initialized(): return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)


def make_variants(arch, classes, queue, batch, ref_classes):
    "name -> step function (no arguments) for one class count; all share the same inputs."
    g = torch.Generator().manual_seed(0)
    im_q, im_k = torch.randn(batch, 3, *CROP, generator=g), torch.randn(batch, 3, *CROP, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    torch.manual_seed(0)
    kw = dict(arch=arch, num_classes=classes, dim=128, queue_size=queue, cls_dim=256, proj_hidden=2048, T=0.07)
    ours = PNL(**kw, num_splits=1).train()
    ours8 = PNL(**kw).train()
    ours8.encoder_q, ours8.encoder_k = ours.encoder_q, ours.encoder_k               # same weights, no second copy
    with torch.no_grad():                                                        # warm prototypes: every row a unit vector
        ours.prototypes.copy_(F.normalize(torch.randn(classes, 128, generator=g), dim=1)); ours8.prototypes.copy_(ours.prototypes)
    prev = copy.deepcopy(ours)
    trunk_q, trunk_k = ours.encoder_q.trunk, ours.encoder_k.trunk
    bottleneck, classifier = ours.encoder_q.bottleneck, ours.encoder_q.classifier
    sched = dict(proto=True, correct=True, label_guided=True)
    sys.path.insert(0, str(REPO / "tests"))
    from reference_pnl import _forward_v0

    def floor(with_cls=False):
        feat = trunk_q(im_q)
        loss = F.cross_entropy(classifier(bottleneck(feat)), labels) if with_cls else feat.square().mean()
        with torch.no_grad(): trunk_k(im_k)
        loss.backward()

    def step(model, fwd=None):
        out = (fwd or (lambda m, *a, **k: m(*a, **k)))(model, im_q, im_k, labels, **sched)
        out["loss"].backward()

    variants = {"floor": floor, "floor+cls": lambda: floor(True), "lupnl": lambda: step(ours),
                "lupnl-8": lambda: step(ours8), "previous": lambda: step(prev, _forward_v0)}
    models = [ours, prev]
    if ref_classes is not None:
        RefPNL, MoCoEncoder = ref_classes
        torch.manual_seed(0)
        ref = RefPNL(MoCoEncoder, getattr(torchvision.models, arch), dim=128, K=queue, m1=0.999, m2=0.999, T=0.07,
                     cls_num=classes, alpha=0.5, pseudo_th=0.8, cls_dim=256).train()
        with torch.no_grad(): ref.prototypes.copy_(ours.prototypes)
        crit = nn.CrossEntropyLoss()

        def ref_step():                                                        # as lup_pnl.py's train loop
            cls_out, target, loss_inst, logits_proto, _ = ref(im_q=im_q, im_k=im_k, target=labels.clone(), is_proto=True,
                                                              is_clean=True, is_supcont=True, topk=(1, 5))
            loss = crit(cls_out, target) + loss_inst + crit(logits_proto, target)
            loss.backward()
        variants["reference"] = ref_step
        models.append(ref)
    return variants, models


def run(arch, crops, class_counts, queue, batch, repeats, ref):
    ref_classes = None
    if ref:
        ref_classes = load_reference(ref)
        init_single_process_group()
    rows = []
    global CROP
    for crop in crops:
        CROP = crop
        for classes in class_counts:
            variants, models = make_variants(arch, classes, queue, batch, ref_classes)
            times, walls = {k: [] for k in variants}, {k: [] for k in variants}
            for r in range(repeats + 1):                                    # round 0: warm-up, not counted
                for name, fn in variants.items():
                    for m in models: m.zero_grad(set_to_none=True)
                    t, c = time.perf_counter(), time.process_time()
                    fn()
                    if r: times[name].append(time.process_time() - c); walls[name].append(time.perf_counter() - t)
            med = {k: min(v) for k, v in times.items()}                     # CPU time, best of: robust to a shared machine
            row = dict(crop=f"{crop[0]}x{crop[1]}", classes=classes, ms={k: round(1000 * v, 1) for k, v in med.items()},
                       wall_ms_median={k: round(1000 * sorted(v)[len(v) // 2], 1) for k, v in walls.items()},
                       over_floor={k: round(med[k] / med["floor"] - 1, 3) for k in med},
                       over_floor_cls={k: round(med[k] / med["floor+cls"] - 1, 3) for k in med})
            if "reference" in med: row["speedup_vs_reference"] = {k: round(med["reference"] / med[k], 3) for k in med}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del variants, models
    return rows


def profile(arch, crop, classes, queue, batch, top=15):
    "Self CPU time of the ops of the lupnl step (a few steps under torch.profiler), the largest first."
    global CROP
    CROP = crop
    variants, models = make_variants(arch, classes, queue, batch, None)
    for _ in range(2): variants["lupnl"]()                                # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            for m in models: m.zero_grad(set_to_none=True)
            variants["lupnl"]()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def table(rows):
    "Markdown table: ms and ratios per (crop, classes)."
    have_ref = "speedup_vs_reference" in rows[0]
    head = ("| crop | classes | floor ms | floor+cls ms | lupnl ms | over floor | over floor+cls | lupnl-8 over floor "
            "| previous over floor |" + (" reference ms | lupnl vs reference | lupnl-8 vs reference |" if have_ref else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms, of, oc = r["ms"], r["over_floor"], r["over_floor_cls"]
        line = (f"| {r['crop']} | {r['classes']:,} | {ms['floor']:.0f} | {ms['floor+cls']:.0f} | {ms['lupnl']:.0f} "
                f"| {of['lupnl']:+.0%} | {oc['lupnl']:+.0%} | {of['lupnl-8']:+.0%} | {of['previous']:+.0%} |")
        if have_ref:
            s = r["speedup_vs_reference"]
            line += f" {ms['reference']:.0f} | {s['lupnl']:.2f}x | {s['lupnl-8']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--crops", default="128x64,64x32", help="comma-separated HxW")
    ap.add_argument("--classes", default="1000,100000,430000", help="comma-separated class counts")
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    ap.add_argument("--ref", default=REF_DEFAULT, help="LUPerson-NL git dir or checkout ('' to skip the reference)")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    ap.add_argument("--profile", action="store_true", help="profile the lupnl step at the first crop / class count instead")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    crops = [tuple(int(v) for v in c.split("x")) for c in a.crops.split(",")]
    classes = [int(c) for c in a.classes.split(",")]
    ref = a.ref if a.ref and Path(a.ref).exists() else None
    if a.ref and ref is None: print(f"reference not found at {a.ref}: skipped", file=sys.stderr)
    if a.profile: return profile(a.arch, crops[0], classes[0], a.queue, a.batch)
    load0 = os.getloadavg()[0]
    t0 = time.time()
    rows = run(a.arch, crops, classes, a.queue, a.batch, a.repeats, ref)
    info = dict(threads=torch.get_num_threads(), load_before=load0, load_after=os.getloadavg()[0], cpus=os.cpu_count(),
                torch=torch.__version__, seconds=round(time.time() - t0), arch=a.arch, batch=a.batch, queue=a.queue)
    print(table(rows)); print(json.dumps(info))
    if a.out: Path(a.out).write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    return rows, info


if __name__ == "__main__":
    main()
