"""lupnl.data: LMDB round trip and errors, real-data benchmark readers, toy dataset noise and determinism,
DataLoader workers over the LMDB, samplers."""
import io, os, pickle, shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lupnl.data import DataError, DataNotFoundError, MissingKeyError, CorruptImageError, UnsafePickleError, Item, load_keys, write_lmdb, write_lmdb_from_folder, LMDBDataset, read_benchmark, read_market1501, read_dukemtmc, read_cuhk03_np, ImageDataset, subset_identities, subset_shots
from lupnl.transforms import TwoViewTransform, reid_test_transform, reid_train_transform, pretrain_strong_transform
from lupnl.samplers import PKSampler, DistributedPKSampler, DistributedShuffleSampler
from lupnl.noise import simulate_noise, measure_noise
from lupnl.toy import make_toy_dataset, toy_dataset
from bench_data import v2_views   # tests/bench_data.py (pytest puts tests/ on sys.path)

SMALL = dict(n_ids=60, imgs_per_id=(8, 14), n_bench_ids=6, n_distractors=2, n_bench_junk=2)  # for noise rates
TINY = dict(n_ids=16, imgs_per_id=(6, 10), n_bench_ids=10, n_distractors=3, n_bench_junk=2)


def _png(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), **TINY)


@pytest.fixture()
def small_lmdb(tmp_path):
    rng = np.random.default_rng(0)
    arrs = [rng.integers(0, 256, (12, 6, 3), dtype=np.uint8) for _ in range(5)]
    write_lmdb(tmp_path / "db", [(_png(a), l) for a, l in zip(arrs, [4, 2, 4, 9, 2])], progress=False)
    return tmp_path / "db", arrs


# ---------------------------------------------------------------- LMDB format

def test_roundtrip_png_pixels_and_labels(small_lmdb):
    root, arrs = small_lmdb
    ds = LMDBDataset(root, return_index=True)
    assert len(ds) == 5 and ds.label_field == "pids"
    assert ds.classes.tolist() == [2, 4, 9] and ds.targets.dtype == np.int64
    assert ds.targets.tolist() == [1, 0, 1, 2, 0] and ds.num_classes == 3
    assert ds.class_to_idx == {2: 0, 4: 1, 9: 2}
    for i, a in enumerate(arrs):
        img, t, j = ds[i]
        assert img.mode == "RGB" and (np.asarray(img) == a).all() and t == ds.targets[i] and j == i
    assert load_keys(root)["keys"] == [f"{i:09d}" for i in range(5)]


def test_roundtrip_jpeg_bytes_decode_identically(tmp_path):
    rng = np.random.default_rng(1)
    jpgs = []
    for _ in range(3):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)).save(b, format="JPEG")
        jpgs.append(b.getvalue())
    ds = LMDBDataset(write_lmdb(tmp_path / "j", [(b, None) for b in jpgs], extra={"vids": [5, 6, 7]}, progress=False))
    assert ds.label_field == "vids" and ds.targets.tolist() == [0, 1, 2]
    for i, b in enumerate(jpgs):
        assert ds.read_bytes(i) == b
        assert (np.asarray(ds[i][0]) == np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))).all()


def test_keys_only_and_extra_fields(tmp_path):
    ds = LMDBDataset(write_lmdb(tmp_path / "k", [(_png(np.zeros((4, 4, 3), np.uint8)), None)] * 3,
                                extra={"true_pids": [1, -1, 2]}, progress=False))
    assert ds.label_field is None and ds.targets.tolist() == [-1, -1, -1] and ds.num_classes == 0
    assert ds.meta == {"true_pids": [1, -1, 2]}


def test_write_lmdb_grows_map(tmp_path):
    big = os.urandom(300_000)
    ds = LMDBDataset(write_lmdb(tmp_path / "g", [(big, i) for i in range(8)], map_size=1 << 20, progress=False))
    assert len(ds) == 8 and ds.read_bytes(7) == big


def test_write_lmdb_from_folder_layouts(tmp_path):
    px = _png(np.full((8, 4, 3), 7, np.uint8))
    for lab in ("0003", "0010"):
        (tmp_path / "sub" / lab).mkdir(parents=True)
        for j in range(2): (tmp_path / "sub" / lab / f"{j}.png").write_bytes(px)
    ds = LMDBDataset(write_lmdb_from_folder(tmp_path / "sub", tmp_path / "o1", progress=False))
    assert ds.labels.tolist() == [3, 3, 10, 10] and ds.meta["files"][2] == "0010/0.png"
    (tmp_path / "flat").mkdir()
    for name in ("0002_c1s1_000451_03.jpg", "-1_c2s1_000001_01.jpg", "0002_c3s1_000500_01.jpg"):
        (tmp_path / "flat" / name).write_bytes(px)
    ds = LMDBDataset(write_lmdb_from_folder(tmp_path / "flat", tmp_path / "o2", progress=False))
    assert ds.labels.tolist() == [-1, 2, 2] and ds.targets.tolist() == [-1, 0, 0]


# ---------------------------------------------------------------- clear errors

def test_error_missing_path(tmp_path):
    with pytest.raises(DataNotFoundError, match="LMDB folder not found: .*nowhere"):
        LMDBDataset(tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="keys file not found: .*keys.pkl"):
        (tmp_path / "empty").mkdir()
        LMDBDataset(tmp_path / "empty")
    with pytest.raises(DataNotFoundError, match="bounding_box_train"):
        read_market1501(tmp_path / "empty")


def test_error_keys_without_keys(tmp_path):
    pickle.dump({"pids": [1, 2]}, open(tmp_path / "keys.pkl", "wb"))
    with pytest.raises(DataError, match=r"keys.pkl: no 'keys' entry \(found: \['pids'\]\)"):
        load_keys(tmp_path)


def test_error_labels_and_keys_differ(small_lmdb):
    root, _ = small_lmdb
    info = load_keys(root)
    pickle.dump({"keys": info["keys"], "pids": info["pids"][:-1]}, open(root / "keys.pkl", "wb"))
    with pytest.raises(DataError, match=r"keys.pkl: 'pids' has 4 entries but 'keys' has 5"):
        LMDBDataset(root)


def test_error_key_absent_from_lmdb(small_lmdb):
    root, _ = small_lmdb
    info = load_keys(root)
    pickle.dump({"keys": info["keys"] + ["000000777"], "pids": info["pids"] + [1]}, open(root / "keys.pkl", "wb"))
    ds = LMDBDataset(root)
    with pytest.raises(MissingKeyError, match=f"key '000000777' \\(item 5\\) is not in the LMDB {root}"):
        ds[5]


def test_error_corrupt_image_skip_and_raise(tmp_path):
    good = _png(np.full((8, 4, 3), 9, np.uint8))
    half = good[: len(good) // 2]  # truncated PNG
    root = write_lmdb(tmp_path / "c", [(good, 1), (b"\xff\xd8 garbage", 2), (half, 3), (good, 4)], progress=False)
    ds = LMDBDataset(root, return_index=True)
    with pytest.warns(UserWarning, match="corrupt image: key '000000001'"):
        img, t, i = ds[1]
    assert (i, t) == (3, ds.class_to_idx[4]) and ds.corrupt == {"000000001", "000000002"}
    with pytest.raises(CorruptImageError, match=f"corrupt image: key '000000002' \\(item 2\\) in the LMDB {root}"):
        LMDBDataset(root, on_corrupt="raise")[2]


def test_error_pickle_loading_a_global_is_refused(tmp_path):
    flag = tmp_path / "pwned"

    class Payload:
        def __reduce__(self): return (os.system, (f"touch {flag}",))

    pickle.dump({"keys": ["000000000"], "pids": Payload()}, open(tmp_path / "keys.pkl", "wb"))
    with pytest.raises(UnsafePickleError, match=r"keys.pkl: refusing to load the global '(posix|os)\.system'"):
        load_keys(tmp_path)
    assert not flag.exists()
    # numpy arrays are fine
    pickle.dump({"keys": np.array(["a", "b"]), "pids": np.array([1, 2])}, open(tmp_path / "keys.pkl", "wb"))
    assert load_keys(tmp_path)["pids"].tolist() == [1, 2]


def test_error_not_a_pickle(tmp_path):
    (tmp_path / "keys.pkl").write_bytes(b"hello")
    with pytest.raises(DataError, match="keys.pkl: not a readable pickle"):
        load_keys(tmp_path)


# ---------------------------------------------------------------- DataLoader workers

def test_dataloader_two_workers_lazy_open(toy):
    ds = LMDBDataset(toy.lmdb, reid_test_transform((64, 32)), return_index=True)
    ds.image(0)  # the main process holds a handle; forked workers must open their own
    dl = DataLoader(ds, batch_size=16, num_workers=2, sampler=PKSampler(ds.targets, 4, 4))
    n = 0
    for x, y, idx in dl:
        assert x.shape == (16, 3, 64, 32) and x.dtype == torch.float32
        assert (ds.targets[idx.numpy()] == y.numpy()).all()
        n += len(y)
    assert n == len(dl.sampler)


def test_dataloader_worker_error_is_ours(small_lmdb):
    root, _ = small_lmdb
    info = load_keys(root)
    pickle.dump({"keys": info["keys"] + ["000000777"], "pids": info["pids"] + [1]}, open(root / "keys.pkl", "wb"))
    it = iter(DataLoader(LMDBDataset(root), batch_size=6, num_workers=2, collate_fn=lambda b: b))
    with pytest.raises(MissingKeyError) as e:
        next(it)
    assert str(e.value).startswith(f"key '000000777' (item 5) is not in the LMDB {root}\n[raised in DataLoader worker process")
    it._shutdown_workers()  # now: left to the garbage collector, torch's shutdown waits 5 s for the workers


def test_two_view_transform(small_lmdb):
    root, _ = small_lmdb
    ds = LMDBDataset(root, TwoViewTransform(reid_train_transform((32, 16), pad=1, erase=0), pretrain_strong_transform((32, 16))))
    (w, s), t = ds[0]
    assert w.shape == s.shape == (3, 32, 16) and type(w) is torch.Tensor


# ---------------------------------------------------------------- real benchmarks

def _counts(items): return len(items), len({i.pid for i in items}), len({i.camid for i in items})


def test_market_mini(shared_data):
    b = read_benchmark(shared_data / "market1501-pepper-mini")
    assert b.name == "market1501"
    assert _counts(b.train) == (32, 16, 6) and _counts(b.gallery) == (32, 16, 6) and _counts(b.query) == (32, 16, 6)
    assert {i.pid for i in b.query} == {i.pid for i in b.gallery} and not {i.pid for i in b.train} & {i.pid for i in b.query}
    assert min(i.camid for i in b.train) == 0 and max(i.camid for i in b.train) == 5
    assert b.query[0] == Item(str(shared_data / "market1501-pepper-mini/query/0004_c2s3_059152_00.jpg"), 4, 1)
    assert "train" in b.summary() and read_dukemtmc(shared_data / "market1501-pepper-mini").name == "dukemtmc"
    ds = ImageDataset(b.train, reid_test_transform(), relabel=True)
    x, label, camid = ds[0]
    assert x.shape == (3, 256, 128) and ds.num_classes == 16 and sorted(set(ds.targets)) == list(range(16))
    assert label == ds.pid2label[b.train[0].pid] and camid == b.train[0].camid


def test_cuhk03_pairs(shared_data):
    b = read_benchmark(shared_data / "cuhk03-labeled-pair1")
    assert b.name == "cuhk03_pairs"
    assert _counts(b.train) == (3898, 400, 2)
    # val: 938 images of 100 ids split by camera into 451 camera-A queries and 487 camera-B gallery images
    assert _counts(b.query) == (451, 100, 1) and _counts(b.gallery) == (487, 100, 1)
    assert {i.camid for i in b.query} == {0} and {i.camid for i in b.gallery} == {1}
    assert min(i.pid for i in b.query) == 400 and not {i.pid for i in b.train} & {i.pid for i in b.query}
    assert all(int(Path(i.path).stem.split("_")[1]) < 5 for i in b.query)


def test_mars_mini_frame_level(shared_data):
    b = read_benchmark(shared_data / "mars-pepper-mini")
    assert b.name == "mars"
    assert _counts(b.train)[:2] == (1719, 16)
    assert len(b.query) == 1783 and len(b.gallery) == 2070 and len({i.pid for i in b.query}) == 16


def test_benchmark_layout_errors(tmp_path):
    with pytest.raises(DataError, match="unknown benchmark layout"):
        read_benchmark(tmp_path)
    (tmp_path / "bounding_box_train").mkdir()
    (tmp_path / "bounding_box_train" / "badname.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="badname.jpg: file name does not start with <pid>_c<cam>"):
        read_market1501(tmp_path)


def test_msmt17_and_cuhk03_np_layouts(tmp_path):
    px = _png(np.zeros((8, 4, 3), np.uint8))
    root = tmp_path / "MSMT17_V1"
    for split, lst, rows in (("train", "list_train.txt", ["0000/0000_000_01_0303morning_0015_0.jpg 0"]),
                             ("train", "list_val.txt", ["0001/0001_004_15_0303noon_0040_1.jpg 1"]),
                             ("test", "list_query.txt", ["0000/0000_000_02_0303morning_0015_0.jpg 0"]),
                             ("test", "list_gallery.txt", ["0000/0000_001_07_0303morning_0016_0.jpg 0"])):
        for r in rows:
            p = root / split / r.split()[0]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(px)
        with open(root / lst, "a") as f: f.write("\n".join(rows) + "\n")
    b = read_benchmark(root)
    assert b.name == "msmt17" and [(i.pid, i.camid) for i in b.train] == [(0, 0), (1, 14)]
    assert b.query[0].camid == 1 and b.gallery[0].camid == 6 and Path(b.gallery[0].path).exists()
    c = tmp_path / "cuhk03-np"
    for kind in ("labeled", "detected"):
        for s, names in (("bounding_box_train", ["0001_c1_1.png", "0001_c2_2.png"]), ("query", ["0700_c1_1.png"]),
                         ("bounding_box_test", ["0700_c2_1.png", "0000_c1_3.png"])):
            (c / kind / s).mkdir(parents=True)
            for n in names: (c / kind / s / n).write_bytes(px)
    b = read_benchmark(c)
    assert b.name == "cuhk03_np_labeled" and _counts(b.train) == (2, 1, 2) and {i.pid for i in b.gallery} == {0, 700}
    assert read_cuhk03_np(c, "detected").name == "cuhk03_np_detected"


def test_subsets():
    items = [Item(f"{p}_{j}.jpg", p, j % 2) for p in range(20) for j in range(p % 5 + 1)]
    s = subset_identities(items, 0.25, seed=3)
    assert len({i.pid for i in s}) == 5 and all(sum(i.pid == p for i in items) == sum(i.pid == p for i in s) for p in {i.pid for i in s})
    assert s == subset_identities(items, 0.25, seed=3) != subset_identities(items, 0.25, seed=4)
    f = subset_shots(items, 0.5, seed=0)
    for p in range(20):
        n = p % 5 + 1
        assert sum(i.pid == p for i in f) == max(1, round(0.5 * n))
    assert [i for i in items if i in f] == f  # original order


# ---------------------------------------------------------------- toy dataset and noise

@pytest.mark.parametrize("rates", [dict(split=0.3, merge=0.1, flip=0.02, junk=0.05),
                                   dict(split=0.2, merge=0.2, flip=0.08, junk=0.1)])
def test_toy_noise_rates_measured(tmp_path, rates):
    t = make_toy_dataset(tmp_path, **SMALL, switch=0.0, **rates)   # switches would count as merges
    ds = LMDBDataset(t.lmdb)
    r = measure_noise(ds.labels, ds.meta["true_pids"])
    for k, v in rates.items(): assert abs(r[k] - v) <= 0.02, (k, r[k], v)
    assert r["purity"] < 1 and r["fragmentation"] > 1 and r["mixing"] > 1


def test_simulate_noise_settings():
    true_ids = np.repeat(np.arange(500), np.arange(500) % 10 + 6)
    for rates in (dict(split=0.2, merge=0.05, flip=0.1, junk=0.02), dict(split=0.4, merge=0.15, flip=0.0, junk=0.2)):
        noisy, true = simulate_noise(true_ids, seed=7, **rates)
        r = measure_noise(noisy, true)
        for k, v in rates.items(): assert abs(r[k] - v) <= 0.02, (k, r[k], v)
        assert ((true == -1) | (true == true_ids)).all()
    clean = measure_noise(true_ids, true_ids)
    assert clean == {**clean, "purity": 1.0, "split": 0.0, "merge": 0.0, "flip": 0.0, "junk": 0.0,
                     "fragmentation": 1.0, "mixing": 1.0}


def test_toy_determinism_and_layout(toy, tmp_path):
    again = make_toy_dataset(tmp_path / "again", **TINY)
    assert (again.lmdb / "data.mdb").read_bytes() == (toy.lmdb / "data.mdb").read_bytes()
    assert (again.lmdb / "keys.pkl").read_bytes() == (toy.lmdb / "keys.pkl").read_bytes()
    b = read_market1501(toy.bench)
    assert not {i.pid for i in b.train} & {i.pid for i in b.query}
    assert {i.pid for i in b.query} <= {i.pid for i in b.gallery} and 0 in {i.pid for i in b.gallery}
    assert len({i.camid for i in b.gallery}) > 2
    assert Image.open(b.train[0].path).size == (64, 128)
    other = make_toy_dataset(tmp_path / "other", **{**TINY, "seed": 1})
    assert (other.lmdb / "data.mdb").read_bytes() != (toy.lmdb / "data.mdb").read_bytes()


def test_toy_dataset_get_or_create(tmp_path, monkeypatch):
    monkeypatch.setenv("LUPNL_DATA", str(tmp_path))
    a = toy_dataset(progress=False, **TINY)
    assert a.root == tmp_path / "toy"
    stamp = (a.lmdb / "data.mdb").stat().st_mtime_ns
    assert toy_dataset(progress=False, **TINY).root == a.root and (a.lmdb / "data.mdb").stat().st_mtime_ns == stamp
    (a.lmdb / "keys.pkl").unlink()  # damaged: regenerated
    toy_dataset(progress=False, **TINY)
    assert (a.lmdb / "keys.pkl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def _get_toy(root, q): q.put(str(toy_dataset(root, progress=False, **TINY).lmdb))


def test_toy_dataset_two_processes_at_once(tmp_path):
    ctx = torch.multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_get_toy, args=(tmp_path / "toy", q)) for _ in range(2)]
    for p in procs: p.start()
    for p in procs: p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert q.get() == q.get() == str(tmp_path / "toy" / "lupnl_nl")
    assert len(LMDBDataset(tmp_path / "toy" / "lupnl_nl")) > 0 and [p.name for p in tmp_path.iterdir()] == ["toy"]


def test_toy_stale_temp_folders_judged_by_host(tmp_path, monkeypatch):
    "`$LUPNL_DATA` may be shared by hosts: pids judge only this host's folders; another host's goes only when a day old."
    import functools, socket, time
    import lupnl.runs, lupnl.toy as toy
    assert toy._alive is lupnl.runs._alive                        # one liveness check, the shared one
    root, here, dead = tmp_path / "toy", socket.gethostname(), 999999999   # above Linux's pid_max (<= 2**22): dead here
    mine_dead, mine_live = tmp_path / f".toy.tmp-{here}-{dead}-deadbeef", tmp_path / f".toy.tmp-{here}-{os.getpid()}-cafecafe"
    other = tmp_path / f".toy.tmp-gpu-node-7.example-{dead}-deadbeef"     # a dash in the host name; its pid means nothing here
    other_old = tmp_path / f".toy.tmp-gpu-node-7.example-{dead}-0123abcd"
    for p in (mine_dead, mine_live, other, other_old): (p / "lupnl_nl").mkdir(parents=True)
    t = time.time() - toy._FOREIGN_STALE_S - 60
    os.utime(other_old, (t, t))
    toy._remove_stale(root)
    assert not mine_dead.exists() and mine_live.exists() and other.exists() and not other_old.exists()
    seen = []                                                     # toy_dataset builds in a folder named for this host + pid
    @functools.wraps(toy.make_toy_dataset)
    def spy(tmp, **kw):
        seen.append(tmp.name)
        raise RuntimeError("stop")
    monkeypatch.setattr(toy, "make_toy_dataset", spy)
    with pytest.raises(RuntimeError, match="stop"): toy_dataset(root, progress=False, **TINY)
    assert seen[0].startswith(f".toy.tmp-{here}-{os.getpid()}-") and not (tmp_path / seen[0]).exists()


def test_lmdb_recreated_at_same_path(tmp_path):
    a = _png(np.full((4, 4, 3), 1, np.uint8))
    write_lmdb(tmp_path / "db", [(a, 1)], progress=False)
    assert (np.asarray(LMDBDataset(tmp_path / "db")[0][0]) == 1).all()
    shutil.rmtree(tmp_path / "db")
    write_lmdb(tmp_path / "db", [(_png(np.full((4, 4, 3), 2, np.uint8)), 1)], progress=False)
    assert (np.asarray(LMDBDataset(tmp_path / "db")[0][0]) == 2).all()


# ---------------------------------------------------------------- samplers

def test_pk_sampler_batches():
    labels = np.repeat(np.arange(30), np.arange(30) % 7 + 1)
    labels[:3] = -1  # unlabelled items are never sampled
    s = PKSampler(labels, p=6, k=4, seed=0)
    idx = np.array(list(s))
    assert len(idx) == len(s) == (len(labels) - 3) // 24 * 24
    for b in idx.reshape(-1, 6, 4):
        lab = labels[b]
        assert len(set(lab[:, 0])) == 6 and (lab == lab[:, :1]).all() and (lab >= 0).all()
        for row, l in zip(b, lab[:, 0]):  # without replacement when the identity has >= k images
            if (labels == l).sum() >= 4: assert len(set(row)) == 4
    s.set_epoch(5); a = list(s); s.set_epoch(5)
    assert list(s) == a and list(s) != a


def test_distributed_samplers_disjoint_equal_shares():
    labels = np.repeat(np.arange(40), 5)
    ranks = [DistributedPKSampler(labels, 4, 2, num_replicas=4, rank=r, seed=1) for r in range(4)]
    for epoch in (0, 1):
        for r in ranks: r.set_epoch(epoch)
        outs = [list(r) for r in ranks]
        assert len({len(o) for o in outs}) == 1 and len(outs[0]) == len(ranks[0]) > 0
        ids = [set(labels[o]) for o in outs]
        assert all(not (ids[a] & ids[b]) for a in range(4) for b in range(a + 1, 4))
    shuf = [DistributedShuffleSampler(range(103), num_replicas=4, rank=r, seed=0) for r in range(4)]
    outs = [list(s) for s in shuf]
    assert {len(o) for o in outs} == {26} and set().union(*outs) == set(range(103))
    assert sum(len(set(o)) for o in outs) >= 103
    assert list(shuf[0]) != outs[0]  # advances its epoch
    with pytest.raises(ValueError, match="rank 4 is not in"):
        DistributedPKSampler(labels, 4, 2, num_replicas=4, rank=4)


# ---------------------------------------------------------------- fast training views: same distributions as torchvision v2

def _stats(tf, img, n, seed):
    "Per-sample summaries of `n` views: mean, std, left-right asymmetry, high-frequency energy, erased fraction."
    torch.manual_seed(seed)
    x = torch.stack([tf(img) for _ in range(n)])
    d = (x[..., 1:, :] - x[..., :-1, :]).abs()
    hf, jump = d.mean((1, 2, 3)), d.flatten(1).quantile(0.99, dim=1)   # blur lowers the jumps at block edges
    lr = (x[..., : x.shape[-1] // 2].mean((1, 2, 3)) - x[..., x.shape[-1] // 2:].mean((1, 2, 3)))
    return dict(mean=x.mean((1, 2, 3)), std=x.std((1, 2, 3)), lr=lr, hf=hf, jump=jump, erased=(x == 0).all(1).float().mean((1, 2)))


def test_blur_radius_rule_shared_by_both_paths(monkeypatch):
    "The per-image blur and the deferred per-batch blur size their kernels with the one rule, `lupnl.transforms._blur_radius`."
    import lupnl.transforms as D
    view = pretrain_strong_transform((64, 32), defer=True)        # v2's radius cap at 64 rows: 3
    x = torch.randint(0, 256, (2, 3, 64, 32), dtype=torch.uint8)
    params = torch.tensor([[1.5, 0, 0, 0, 0], [0.9, 0, 0, 0, 0]])  # sigma; no erasing
    want = [D._blur_batch(view._norm(x[n:n + 1]), params[n:n + 1, 0], 1)[0] for n in range(2)]   # radius 1
    monkeypatch.setattr(D, "_blur_radius", lambda s, H, W, m=None: torch.ones_like(s, dtype=torch.long) if torch.is_tensor(s) else 1)
    assert torch.equal(D.gaussian_blur(view._norm(x[0]), 1.5, view.max_radius), want[0])
    assert all(torch.equal(a, b) for a, b in zip(view.finish(x, params), want))
    monkeypatch.undo()                                            # the real rule (radius 3 here) gives other pixels
    assert not torch.equal(D.gaussian_blur(view._norm(x[0]), 1.5, view.max_radius), want[0])
    assert torch.equal(view.finish(x, params)[0], D.gaussian_blur(view._norm(x[0]), 1.5, view.max_radius))


@pytest.mark.parametrize("which", ["strong", "train"])
def test_fast_views_match_v2_distributions(which):
    from scipy.stats import ks_2samp
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (8, 4, 3)).astype(np.uint8)   # a blocky image: blur, crops and flips all show
    img = Image.fromarray(base).resize((64, 128), Image.NEAREST)
    size = (128, 64)
    weak, strong = v2_views(size, pad=5, erase=0.5)               # the v2 pipelines tests/bench_data.py times
    fast, ref = ((pretrain_strong_transform(size), strong) if which == "strong"
                 else (reid_train_transform(size, pad=5, erase=0.5), weak))
    a, b = _stats(fast, img, 1500, 0), _stats(ref, img, 1500, 1)
    for k in a:   # every summary is distributed alike (two-sample KS test; rounded: float rounding must not split ties)
        assert ks_2samp(a[k].numpy().round(3), b[k].numpy().round(3)).pvalue > 1e-3, k
