"""Benchmark: two-view pre-training samples per second from the built-in LMDB at 256x128, lupnl against the
reference (LUPerson-NL's PNL `PersonDatasetFM` with its weak / strong transforms), side by side in one run.

Run by hand from the repository root (not collected by pytest):

    python -m tests.bench_data --ref /work/.mirror/DengpanFu+LUPerson-NL/repo [--ref-deps DIR] [--batches 20 --repeats 3]

`--ref` is a copy of github:DengpanFu/LUPerson-NL (a git directory or a checkout). Its `PNL/libs/dataset.py` and
`transform.py` are extracted to a temporary folder outside this repository and imported from there (nothing
of it is copied into lupnl). It decodes with OpenCV: `cv2` must be importable, e.g. from a
`pip install --target DIR opencv-python-headless` folder given as `--ref-deps DIR`. Two shims, both outside
the reference's code: `np.int = int` (the reference predates NumPy 1.24, which removed the alias).

The reference reads a byte copy of the same LMDB (checked). Its settings are those of its PNL run
(`run_pnl.sh`): weak = `get_reid_train_transformer(mean_type, with_re=False)`, strong =
`get_lup_transformer('ori-cj+sre', mean_type)`. lupnl's are `pretrain.weak_view` (the re-ID view without
erasing, pad 10) and `data.pretrain_strong_transform`, per image in the workers ("lupnl"), or with the per-pixel
steps deferred to one `finish` call per batch ("lupnl batched"; timed here in the main process on the CPU, where
training would run it on the GPU; "workers' share" leaves `finish` out: the CPU's part when a GPU does it); `--v2` adds the torchvision v2 pipeline lupnl used
before. Every pipeline runs in this process with one intra-op thread (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`,
the same in each worker), interleaved across repeats so they see the same machine load; the load average
is printed with the results. Nothing is written into the repository.
"""
import os
if __name__ == "__main__":   # run as the benchmark (not imported by tests/test_data.py): one intra-op thread
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
import argparse, hashlib, io, json, platform, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lupnl.toy import toy_dataset
from lupnl.data import LMDBDataset, _decode, _decode_tensor
from lupnl.transforms import TwoViewTransform, reid_train_transform, pretrain_strong_transform, IMAGENET_MEAN, IMAGENET_STD

SIZE = (256, 128)
FINISH = {}  # pipeline name -> the per-batch step it needs after the DataLoader


def _pin(_=None):
    torch.set_num_threads(1)
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError: pass


def reference_libs(ref, deps=None):
    "Import the reference's `libs.dataset` and `libs.transform` from a temporary copy of `ref` -> (dataset module, transform module)."
    ref = Path(ref)
    out = Path(tempfile.mkdtemp(prefix="lupnl_ref_")) / "libs"
    out.mkdir()
    for name in ("dataset.py", "transform.py"):
        if (ref / "PNL" / "libs" / name).exists(): text = (ref / "PNL" / "libs" / name).read_text()
        else: text = subprocess.run(["git", "--git-dir", str(ref), "show", f"HEAD:PNL/libs/{name}"], check=True,
                                    capture_output=True, text=True).stdout
        (out / name).write_text(text)
    (out / "__init__.py").write_text("")
    if deps: sys.path.insert(0, str(deps))
    try: import cv2  # noqa: F401
    except ImportError: sys.exit("the reference decodes with OpenCV: make `cv2` importable (--ref-deps DIR)")
    if not hasattr(np, "int"): np.int = int  # removed in NumPy 1.24; the reference uses it for its labels
    sys.path.insert(0, str(out.parent))
    import libs.dataset as rd, libs.transform as rt
    return rd, rt


def v2_views(size, pad=10, erase=0.0):
    """lupnl's (weak, strong) views as torchvision v2 compositions (before the fast views): the weak one is the re-ID
    view with padding `pad` and random erasing `erase` (none by default, as pre-training's). tests/test_data.py checks
    that the fast views draw from the same distributions."""
    from torchvision.transforms import v2
    fin = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    weak = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.RandomHorizontalFlip(), v2.Pad(pad),
                       v2.RandomCrop(size), *fin, *([v2.RandomErasing(p=erase, value=0)] if erase else []), v2.ToPureTensor()])
    k = 2 * int(0.05 * size[0]) + 1
    strong = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
                         v2.RandomGrayscale(p=0.2), v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
                         v2.RandomHorizontalFlip(), *fin, v2.RandomErasing(p=0.5, scale=(0.02, 0.6), value=0),
                         v2.ToPureTensor()])
    return weak, strong


def pipelines(lmdb_dir, ref_dir, rd, rt, with_v2):
    "name -> (dataset, weak, strong, decode function)."
    weak, strong = reid_train_transform(SIZE, pad=10, erase=0), pretrain_strong_transform(SIZE)
    two = TwoViewTransform(weak, strong)
    out = {"lupnl": (LMDBDataset(lmdb_dir, two), weak, strong, lambda b: _decode_tensor(b, two.draft))}
    dw, dsv = reid_train_transform(SIZE, pad=10, erase=0, defer=True), pretrain_strong_transform(SIZE, defer=True)
    later = TwoViewTransform(dw, dsv)
    FINISH["lupnl batched"] = later.finish   # per-pixel steps per batch, here in the main process on the CPU
    out["lupnl batched, workers' share"] = (LMDBDataset(lmdb_dir, later), None, None, None)  # what is left on the CPU when `finish` runs on a GPU
    out["lupnl batched"] = (LMDBDataset(lmdb_dir, later), lambda im: dw.finish(*[t[None] for t in dw(im)]),
                            lambda im: dsv.finish(*[t[None] for t in dsv(im)]), lambda b: _decode_tensor(b, later.draft))
    if with_v2:
        w2, s2 = v2_views(SIZE)
        out["lupnl v2 (before)"] = (LMDBDataset(lmdb_dir, TwoViewTransform(w2, s2)), w2, s2, _decode)
    if rd is not None:
        rw = rt.get_reid_train_transformer("lmdb_200_20", with_re=False)
        rs = rt.get_lup_transformer("ori-cj+sre", "lmdb_200_20", two_crop=False)
        import cv2
        from PIL import Image
        def ref_decode(buf):
            im = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
            return Image.fromarray(cv2.cvtColor(im, cv2.COLOR_BGR2RGB))
        out["reference"] = (rd.PersonDatasetFM(str(ref_dir), str(ref_dir / "keys.pkl"), rw, rs), rw, rs, ref_decode)
    return out


def rate(ds, workers, batches, batch_size, warmup, seed, finish=None):
    "Two-view samples per second over `batches` batches after `warmup` (DataLoader, shuffled, seeded), `finish` included."
    g = torch.Generator().manual_seed(seed)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, generator=g, drop_last=True,
                    worker_init_fn=_pin if workers else None)
    it = iter(dl)
    for _ in range(warmup):
        b = next(it)
        if finish is not None: finish(b[0])
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        if finish is not None: w, s = finish(b[0])
        n += len(b[-1])
    dt = time.perf_counter() - t
    del it
    return n / dt


def stages(ds, weak, strong, decode, n, seed=0):
    "Per-sample ms of decode, weak view and strong view, in this process."
    torch.manual_seed(seed)
    idx = np.random.default_rng(seed).choice(len(ds), n, replace=False)
    if isinstance(ds, LMDBDataset): bufs = [ds.read_bytes(int(i)) for i in idx]
    else:  # the reference's own handle
        if ds.env is None: ds._init_lmdb()
        with ds.env.begin() as txn: bufs = [txn.get(ds.keys[i].encode("ascii")) for i in idx]
    t = time.perf_counter(); imgs = [decode(b) for b in bufs]; t_dec = time.perf_counter() - t
    t = time.perf_counter(); [weak(im) for im in imgs]; t_w = time.perf_counter() - t
    t = time.perf_counter(); [strong(im) for im in imgs]; t_s = time.perf_counter() - t
    return {k: round(v / n * 1e3, 3) for k, v in (("decode", t_dec), ("weak", t_w), ("strong", t_s))}


def _sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return dict(cpu=cpu, cores=os.cpu_count(), affinity=len(os.sched_getaffinity(0)), torch=torch.__version__,
                threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", help="copy of github:DengpanFu/LUPerson-NL (git dir or checkout); omit to run lupnl only")
    ap.add_argument("--ref-deps", help="folder to put on sys.path for the reference's dependencies (cv2)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stage-samples", type=int, default=200)
    ap.add_argument("--v2", action="store_true", help="also time lupnl's former torchvision v2 pipeline")
    ap.add_argument("--json", help="also write the results to this file (outside the repository)")
    a = ap.parse_args()
    _pin()
    toy = toy_dataset(progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="lupnl_bench_data_"))
    try:
        ref_dir = tmp / "ref_lmdb"
        ref_dir.mkdir()
        for f in ("data.mdb", "keys.pkl"):
            shutil.copyfile(toy.lmdb / f, ref_dir / f)
            assert _sha(toy.lmdb / f) == _sha(ref_dir / f)
        rd, rt = reference_libs(a.ref, a.ref_deps) if a.ref else (None, None)
        pipes = pipelines(toy.lmdb, ref_dir, rd, rt, a.v2)
        load0 = os.getloadavg()
        res = {name: {w: [] for w in a.workers} for name in pipes}
        for r in range(a.repeats):  # interleaved: every pipeline sees the same load
            for w in a.workers:
                for name, (ds, *_ ) in pipes.items():
                    res[name][w].append(rate(ds, w, a.batches, a.batch_size, a.warmup, seed=r, finish=FINISH.get(name)))
        st = {name: stages(ds, wk, sg, dec, a.stage_samples) for name, (ds, wk, sg, dec) in pipes.items() if wk is not None}
        load1 = os.getloadavg()
    finally: shutil.rmtree(tmp, ignore_errors=True)
    med = {n: {w: float(np.median(v)) for w, v in d.items()} for n, d in res.items()}
    info = dict(machine=machine(), load_before=load0, load_after=load1, images=len(pipes["lupnl"][0]), size=SIZE,
                batch_size=a.batch_size, batches=a.batches, repeats=a.repeats, samples_per_s=med, all=res, stages_ms=st)
    print(f"# two-view samples/s, built-in LMDB ({info['images']} JPEG crops 128x64) -> {SIZE[0]}x{SIZE[1]}, "
          f"batch {a.batch_size}, median of {a.repeats} x {a.batches} batches")
    print(f"# {info['machine']}; load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    names = list(pipes)
    mine = [n for n in names if n.startswith("lupnl") and "v2" not in n and "share" not in n]
    ref = "reference" in med
    print("| workers | " + " | ".join(names) + "".join(f" | {n} / reference" for n in mine if ref) + " |")
    print("|---" * (len(names) + 1 + ref * len(mine)) + "|")
    for w in a.workers:
        row = " | ".join(f"{med[n][w]:.1f}" for n in names)
        ratio = "".join(f" | {med[n][w] / med['reference'][w]:.2f}x" for n in mine if ref)
        print(f"| {w} | {row}{ratio} |")
    print("\nper sample, one process (ms): " + "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for n, s in st.items()))
    if a.json: Path(a.json).write_text(json.dumps(info, indent=1, default=str))


if __name__ == "__main__":
    main()
