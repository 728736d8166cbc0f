"""lupnl.explore (with lupnl.noise and lupnl.tracks) on real data and the built-in toy dataset: noise report,
simulator rates, MOT17 cropping, benchmark statistics, sampling bounds. Expected values are computed independently of lupnl.explore where possible."""
import csv, json, pickle, shutil, sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lupnl.data import DataError, DataNotFoundError, LMDBDataset, load_keys, read_benchmark
from lupnl.noise import compare_labelings, label_owners, measure_noise, noise_report, purity, simulate_noise
from lupnl.toy import toy_dataset
from lupnl.explore import image_sizes, label_stats, plot_label_stats, plot_summary, sample_grid, benchmark_stats
from lupnl.tracks import crops_from_tracks, noisy_lmdb, plan_crops, read_frames, read_mot, tracks_to_lmdb

RATES = ("split", "merge", "flip", "junk")


@pytest.fixture(scope="module")
def toy():
    return toy_dataset(progress=False)


class CountingLMDB(LMDBDataset):
    "An LMDBDataset that records every LMDB read."
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reads = []

    def read_bytes(self, i):
        self.reads.append(int(i))
        return super().read_bytes(i)


# --- noise report --------------------------------------------------------------------------------------------

def test_noise_report_gives_the_toy_generation_rates(toy):
    params = json.loads((toy.root / "toy.json").read_text())["params"]
    info = load_keys(toy.lmdb)
    rep = noise_report(info["pids"], info["true_pids"])
    for k in ("split", "flip", "junk"): assert abs(rep[k] - params[k]) <= 0.02, (k, rep[k], params[k])
    # an ID switch moves a group of >= 2 images into another person's label: measured as a merge
    assert params["merge"] - 0.02 <= rep["merge"] <= params["merge"] + params["switch"] + 0.02
    assert rep["fixable"] > 0.6 and 0 < rep["bcubed_f"] < 1
    true = np.asarray(info["true_pids"])
    assert rep["junk"] == pytest.approx((true == -1).mean())
    # the distributions agree with the means and with a plain-python count
    pairs = Counter((l, t) for l, t in zip(info["pids"], info["true_pids"]) if t >= 0)
    frag = Counter(t for _, t in pairs)
    assert rep["per_identity"]["labels"].to_dict() == dict(frag)
    assert rep["per_identity"]["labels"].mean() == pytest.approx(rep["fragmentation"])


def _brute_owner(labels, true):
    by = {}
    for l, t in zip(labels, true):
        if t >= 0: by.setdefault(l, Counter())[t] += 1
    return {l: min(c, key=lambda t: (-c[t], t)) for l, c in by.items()}


def test_owners_purity_and_compare_against_brute_force():
    rng = np.random.default_rng(0)
    for sparse in (False, True):
        true = rng.integers(-1, 30, 2000)
        before = rng.integers(0, 60, 2000) * (997 if sparse else 1)
        after = before.copy()
        ch = rng.random(2000) < 0.2
        after[ch] = rng.choice(np.unique(before), ch.sum())
        own = _brute_owner(before.tolist(), true.tolist())
        ul, owner, _ = label_owners(before, true)
        got = {int(l): int(o) for l, o in zip(ul, owner) if o >= 0}
        assert got == own
        ok_b = np.array([own.get(l) == t for l, t in zip(before, true)])
        ok_a = np.array([own.get(l) == t for l, t in zip(after, true)])
        real, changed = true >= 0, before != after
        wrong = real & ~ok_b
        c = compare_labelings(true, before, after)
        assert c["n_changed"] == changed.sum() and c["changed"] == pytest.approx(changed.mean())
        # every changed image is exactly one of: fix, neutral (junk, or right -> right), broken, wrong -> wrong
        kinds = [sum(1 for i in np.flatnonzero(changed) if f(i)) for f in (
            lambda i: real[i] and not ok_b[i] and ok_a[i], lambda i: not real[i] or (ok_b[i] and ok_a[i]),
            lambda i: real[i] and ok_b[i] and not ok_a[i], lambda i: real[i] and not ok_b[i] and not ok_a[i])]
        assert [c["n_fixed"], c["n_neutral"], c["n_broken"], c["n_wrong_to_wrong"]] == kinds and sum(kinds) == changed.sum()
        assert c["precision"] == pytest.approx(kinds[0] / changed.sum())
        assert c["recall"] == pytest.approx((wrong & ok_a).sum() / wrong.sum())
        assert c["purity_before"] == pytest.approx(ok_b[real].mean())
        own_a = _brute_owner(after.tolist(), true.tolist())
        assert c["purity_after"] == pytest.approx(np.mean([own_a.get(l) == t for l, t in zip(after[real], true[real])]))
    with pytest.raises(ValueError, match="one length"): compare_labelings([1, 2], [1, 2], [1])


def test_measure_noise_against_brute_force():
    "Purity, fixable, split and BCubed (`lupnl.noise._scores`) recomputed image by image."
    rng = np.random.default_rng(1)
    for sparse in (False, True):
        true = rng.integers(-1, 25, 1500)
        noisy = np.where(rng.random(1500) < 0.3, rng.integers(0, 40, 1500), true + 1) * (991 if sparse else 1)
        m = measure_noise(noisy, true)
        own = _brute_owner(noisy.tolist(), true.tolist())
        real = true >= 0
        ok = np.array([own.get(l) == t for l, t in zip(noisy, true)]) & real
        wrong = real & ~ok
        owners = set(own.values())
        assert m["purity"] == pytest.approx(ok[real].mean())
        assert m["n_wrong"] == wrong.sum()
        assert m["fixable"] == pytest.approx(np.mean([t in owners for t in true[wrong]]))
        per_id = Counter(own.values())
        assert m["split"] == pytest.approx(np.mean([per_id[t] >= 2 for t in np.unique(true[real])]))
        l, t = noisy[real], true[real]
        same = [((l == a) & (t == b)).sum() for a, b in zip(l, t)]
        p = np.mean([s / (l == a).sum() for s, a in zip(same, l)])
        r = np.mean([s / (t == b).sum() for s, b in zip(same, t)])
        assert (m["bcubed_precision"], m["bcubed_recall"]) == (pytest.approx(p), pytest.approx(r))
        assert m["bcubed_f"] == pytest.approx(2 * p * r / (p + r))


# --- simulator on the CUHK03 subset ------------------------------------------------------------------------

@pytest.mark.parametrize("rates", [dict(split=0.3, merge=0.1, flip=0.05, junk=0.05),
                                   dict(split=0.1, merge=0.25, flip=0.1, junk=0.1)])
def test_simulator_rates_on_cuhk03(shared_data, rates):
    train = read_benchmark(shared_data / "cuhk03-labeled-pair1").train
    assert (len(train), len({i.pid for i in train})) == (3898, 400)
    noisy, true = simulate_noise([i.pid for i in train], seed=1, **rates)
    rep = noise_report(noisy, true)
    for k, v in rates.items(): assert abs(rep[k] - v) <= 0.02, (k, rep[k], v)
    assert (true[true >= 0] == np.array([i.pid for i in train])[true >= 0]).all()


def test_noisy_lmdb_round_trip_on_cuhk03(shared_data, tmp_path):
    train = read_benchmark(shared_data / "cuhk03-labeled-pair1").train
    rates = dict(split=0.2, merge=0.1, flip=0.05, junk=0.05)
    out = noisy_lmdb(train, tmp_path / "cuhk", seed=3, progress=False, **rates)
    ds = LMDBDataset(out)
    noisy, true = simulate_noise([i.pid for i in train], seed=3, **rates)
    assert (ds.labels == noisy).all() and (np.asarray(ds.meta["true_pids"]) == true).all()
    assert ds.meta["camids"] == [i.camid for i in train]
    for j in (0, 1234, len(train) - 1):
        assert ds.read_bytes(j) == Path(train[j].path).read_bytes()
    rep = noise_report(ds.labels, ds.meta["true_pids"])
    for k, v in rates.items(): assert abs(rep[k] - v) <= 0.02


# --- MOT17 -------------------------------------------------------------------------------------------------

def _expected_mot_boxes(seq, classes, min_conf, min_vis, min_h, min_w, aspect, every_k, tracked_only=False,
                        tracks_file="gt/gt.txt"):
    "Independent count: (track, frame) of the rows of a MOT file that pass the filters in frames present on disk."
    frames = {int(p.stem): p for p in (seq / "img1").glob("*.jpg")}
    sizes = {f: Image.open(p).size for f, p in frames.items()}
    out = []
    with open(seq / tracks_file) as fh:
        for row in csv.reader(fh):
            v = [float(x) for x in row]
            f, tid, x, y, w, h, conf = int(v[0]), int(v[1]), *v[2:7]
            cls, vis = (int(v[7]), v[8]) if len(v) == 9 else (1, 1.0)
            if f not in sizes or cls not in classes or conf < min_conf or vis < min_vis or (f - 1) % every_k: continue
            if tracked_only and tid < 0: continue
            W, H = sizes[f]
            x0, x1 = [min(max(round(a), 0), W) for a in (x - 1, x - 1 + w)]
            y0, y1 = [min(max(round(a), 0), H) for a in (y - 1, y - 1 + h)]
            bw, bh = x1 - x0, y1 - y0
            if bw <= 0 or bh <= 0 or bh < min_h or bw < min_w or not aspect[0] * bh <= bw <= aspect[1] * bh: continue
            out.append((tid, f, (x0, y0, x1, y1)))
    return out


FILTERS = [dict(classes=(1,), min_conf=0.5, min_visibility=0.0, min_height=40, min_width=16, aspect=(0.15, 1.0), every_k=1),
           dict(classes=(1,), min_conf=0.5, min_visibility=0.3, min_height=80, min_width=20, aspect=(0.2, 0.8), every_k=2),
           dict(classes=(1, 2, 7), min_conf=0.0, min_visibility=0.0, min_height=1, min_width=1, aspect=(0.0, 100.0), every_k=1)]


@pytest.mark.parametrize("filters", FILTERS)
def test_mot17_crops_match_gt_boxes_in_present_frames(shared_data, tmp_path, filters):
    root = shared_data / "mot17-mini" / "train"
    seqs = sorted(d for d in root.iterdir() if (d / "img1").is_dir())
    assert len(seqs) == 7
    f = dict(filters)
    expected = {s.name: _expected_mot_boxes(s, f["classes"], f["min_conf"], f["min_visibility"], f["min_height"],
                                            f["min_width"], f["aspect"], f["every_k"]) for s in seqs}
    n_expected = sum(map(len, expected.values()))
    assert n_expected > 0
    out = tracks_to_lmdb(root, tmp_path / "mot", progress=False, **filters)
    ds = LMDBDataset(out)
    assert len(ds) == n_expected
    got = Counter(zip(ds.meta["videos"], ds.meta["tracks"], ds.meta["frames"], map(tuple, ds.meta["boxes"])))
    assert got == Counter((v, t, fr, b) for v, rows in expected.items() for t, fr, b in rows)
    # labels are <video>_<track id>, one integer pid per distinct label
    assert ds.meta["labels"] == [f"{v}_{t}" for v, t in zip(ds.meta["videos"], ds.meta["tracks"])]
    pid_of = {}
    for lab, pid in zip(ds.meta["labels"], ds.labels.tolist()): assert pid_of.setdefault(lab, pid) == pid
    assert len(set(pid_of.values())) == len(pid_of) == ds.num_classes
    # the stored crop has the clipped box's size
    for j in (0, len(ds) // 2, len(ds) - 1):
        x0, y0, x1, y1 = ds.meta["boxes"][j]
        assert ds.image(j).size == (x1 - x0, y1 - y0)


def test_mot17_det_boxes_only_in_present_frames(shared_data):
    seq = shared_data / "mot17-mini" / "train" / "MOT17-05-FRCNN"
    det = read_mot(seq / "det" / "det.txt")
    assert det.frame.max() > 100 and (det.id == -1).all()  # det.txt covers the whole sequence
    exp = _expected_mot_boxes(seq, (1,), 0.0, 0.0, 30, 10, (0.1, 1.0), 1, tracks_file="det/det.txt")
    crops = list(crops_from_tracks(seq, seq / "det" / "det.txt", min_conf=0.0, min_height=30, min_width=10, aspect=(0.1, 1.0)))
    assert len(crops) == len(exp) > 0
    assert {c.frame for c in crops} <= {int(p.stem) for p in (seq / "img1").glob("*.jpg")}


def test_video_file_gives_the_same_crops_as_the_frame_folder(shared_data, tmp_path):
    av = pytest.importorskip("av")
    seq = shared_data / "mot17-mini" / "train" / "MOT17-05-FRCNN"
    frames = [im for _, im in read_frames(seq)]
    video = tmp_path / "seq.mkv"
    with av.open(str(video), "w") as c:  # lossless, so the pixels survive
        st = c.add_stream("ffv1", rate=14)
        st.width, st.height, st.pix_fmt = frames[0].width, frames[0].height, "bgr0"
        for im in frames:
            for pk in st.encode(av.VideoFrame.from_image(im).reformat(format="bgr0")): c.mux(pk)
        for pk in st.encode(): c.mux(pk)
    a = list(crops_from_tracks(seq, seq / "gt" / "gt.txt"))
    b = list(crops_from_tracks(video, seq / "gt" / "gt.txt", video="MOT17-05-FRCNN"))
    assert len(a) == len(b) > 0
    assert [(x.track, x.frame, x.box) for x in a] == [(x.track, x.frame, x.box) for x in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))


def test_video_without_pyav_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 16)
    with pytest.raises(ImportError, match="clip.mp4 needs PyAV"): list(read_frames(tmp_path / "clip.mp4"))


def test_read_mot_errors_name_the_file(tmp_path):
    p = tmp_path / "broken_gt.txt"
    p.write_text("1,2,3,4\n")
    with pytest.raises(Exception, match="broken_gt.txt"): read_mot(p)
    with pytest.raises(FileNotFoundError, match="missing.txt"): read_mot(tmp_path / "missing.txt")


def test_read_mot_formats_and_bad_input(tmp_path):
    def mot(text, name="t.txt"):
        p = tmp_path / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p
    for empty in ("", " \n\n\t\n"):
        df = read_mot(mot(empty))
        assert len(df) == 0 and list(df.columns) == ["frame", "id", "x", "y", "w", "h", "conf", "cls", "vis"]
        assert [str(d) for d in df.dtypes] == ["int64", "int64"] + ["float64"] * 5 + ["int64", "float64"]
    gt = read_mot(mot("1,7,10.5,20,30,60,1,2,0.25\r\n2, 8, 1, 1, 5, 5, 0, 7, 1\r\n"))  # 9 columns: ground truth
    assert gt.values.tolist() == [[1, 7, 10.5, 20, 30, 60, 1, 2, 0.25], [2, 8, 1, 1, 5, 5, 0, 7, 1]]
    assert gt.frame.dtype == np.int64 and gt.cls.dtype == np.int64
    det = read_mot(mot("\ufeff1,-1,10,20,30,60,0.8,-1,-1,-1\n"))  # 10 columns: detections; a UTF-8 BOM is skipped
    assert det.values.tolist() == [[1, -1, 10, 20, 30, 60, 0.8, 1, 1.0]]
    assert read_mot(mot("3,4,1,2,3,4\n"))[["conf", "cls", "vis"]].values.tolist() == [[1.0, 1, 1.0]]
    for bad in ("1,2,3,4,,6\n", "1,2,a,b,c,d\n", "1\t2\t3\t4\t5\t6\n"):
        with pytest.raises(DataError, match="bad.txt: expected >= 6 numeric"): read_mot(mot(bad, "bad.txt"))
    with pytest.raises(DataError, match="ragged.txt: not a MOTChallenge csv file .*Expected 6 fields in line 2, saw 8"):
        read_mot(mot("1,2,3,4,5,6\n1,2,3,4,5,6,7,8\n", "ragged.txt"))
    with pytest.raises(DataError, match=r"utf16.txt: not UTF-8 text \(byte 0"):   # e.g. UTF-16 from a Windows tool
        read_mot(mot(b"\xff\xfe\x00garbage\n", "utf16.txt"))
    assert read_mot(mot(b"\xef\xbb\xbf \n", "bom.txt")).empty                    # a byte-order mark alone: empty
    with pytest.raises(DataNotFoundError, match="MOT file not found"): read_mot(tmp_path)


def test_read_mot_opens_the_file_once(tmp_path, monkeypatch):
    import builtins, io
    p = tmp_path / "gt.txt"
    p.write_text("".join(f"{f},{i},1,2,3,4,1,1,1\n" for f in range(1, 50) for i in range(3)))
    opened = []
    for mod in (builtins, io):
        real = getattr(mod, "open")
        def counting(file, *a, _real=real, **k):
            if str(file) == str(p): opened.append(file)
            return _real(file, *a, **k)
        monkeypatch.setattr(mod, "open", counting)
    df = read_mot(p)
    assert len(df) == 147 and len(opened) == 1


# --- benchmarks --------------------------------------------------------------------------------------------

def test_benchmark_stats_market_mini(shared_data):
    st = benchmark_stats(read_benchmark(shared_data / "market1501-pepper-mini"))
    assert st["valid_queries"] == 30
    assert sorted(Path(p).name for p in st["invalid_queries"]) == ["0013_c5s1_000426_00.jpg", "0016_c6s1_011151_00.jpg"]
    assert st["splits"].loc["train"].tolist() == [32, 16, 6]
    assert st["shared_train_test_ids"] == 0


def test_benchmark_stats_cuhk03_subset(shared_data):
    b = read_benchmark(shared_data / "cuhk03-labeled-pair1")
    st = benchmark_stats(b)
    assert st["splits"].loc["train"].tolist() == [3898, 400, 2]
    assert st["splits"].loc["query", "ids"] == st["splits"].loc["gallery", "ids"] == 100
    # every val identity has both cameras: every camera-A query has a camera-B gallery image
    assert st["valid_queries"] == len(b.query) and st["shared_train_test_ids"] == 0


# --- sampling bounds and keys-only statistics ---------------------------------------------------------------

def test_sampling_functions_read_at_most_n_sample_images(toy):
    ds = CountingLMDB(toy.lmdb)
    sizes = image_sizes(ds, n_sample=37, seed=5)
    assert len(ds.reads) == 37 == len(set(ds.reads)) and sorted(ds.reads) == sizes.index.tolist()
    ds.reads.clear()
    sample_grid(ds, n_ids=3, per_id=4, seed=1)
    assert 0 < len(ds.reads) <= 12
    ds.reads.clear()
    plot_summary(ds, n_sample=25)
    assert len(ds.reads) == 25
    import matplotlib.pyplot as plt
    plt.close("all")


def test_label_stats_need_only_keys_pkl(toy, tmp_path):
    shutil.copy(toy.lmdb / "keys.pkl", tmp_path / "keys.pkl")  # no LMDB next to it
    s, per = label_stats(tmp_path)
    info = pickle.load(open(toy.lmdb / "keys.pkl", "rb"))
    counts = Counter(info["pids"])
    assert s["images"] == len(info["keys"]) and s["labels"] == len(counts)
    assert per["images"].to_dict() == dict(counts)
    assert s["source_kind"] == "camids" and s["sources"] == len(set(info["camids"]))
    # LUPerson-NL keys carry the video as their prefix
    keys = [f"{v:05d}_{p:06d}_{f:07d}_00" for v, p, f in [(1, 1, 5), (1, 2, 9), (2, 3, 1), (2, 3, 2), (2, 4, 8)]]
    s2, _ = label_stats({"keys": keys, "pids": [1, 2, 3, 3, 4]})
    assert (s2["source_kind"], s2["sources"], s2["labels_per_source_max"]) == ("key prefix", 2, 2)


def test_label_stats_unlabelled_and_long_tailed(monkeypatch):
    import matplotlib.pyplot as plt
    import pandas as pd
    import lupnl.explore as ex
    # nothing labelled, but sources known: the image counts, no per-source numbers (it used to raise)
    s, per = label_stats({"keys": ["v1_a", "v2_b"], "pids": [-1, -1]})
    assert s == dict(images=2, unlabelled=2, labels=0, label_field="pids") and len(per) == 0
    plt.close(plot_label_stats({"keys": ["v1_a", "v2_b"], "pids": [-1, -1]}))
    # one table of (label, source), grouped once by source and once by label
    rng = np.random.default_rng(0)
    pids, vids = rng.integers(-1, 300, 6000), rng.integers(0, 40, 6000)
    info = {"keys": [f"k{i}" for i in range(6000)], "pids": pids.tolist(), "videos": vids.tolist()}
    groupbys, sources = [], []
    real_gb, real_src = pd.DataFrame.groupby, ex.label_sources
    monkeypatch.setattr(pd.DataFrame, "groupby", lambda self, by, *a, **k: groupbys.append(by) or real_gb(self, by, *a, **k))
    s, per = label_stats(info)
    assert sorted(groupbys) == ["label", "source"]
    monkeypatch.setattr(pd.DataFrame, "groupby", real_gb)
    ok = pids >= 0
    by_src = {v: len(set(pids[ok & (vids == v)])) for v in np.unique(vids[ok])}
    assert (s["sources"], s["labels_per_source_max"]) == (len(by_src), max(by_src.values()))
    assert s["labels_per_source_median"] == np.median(list(by_src.values()))
    assert per["sources"].tolist() == [len(set(vids[pids == p])) for p in per.index]
    monkeypatch.setattr(ex, "label_sources", lambda i: sources.append(1) or real_src(i))
    fig = plot_label_stats(info)                    # the sources are looked up once
    assert len(sources) == 1 and fig.axes[1].get_title() == f"{len(by_src)} sources"
    assert sum(b.get_height() for b in fig.axes[1].patches) == len(by_src)
    plt.close(fig)
    # labels with > 200 images: log-spaced bins (np.bool_ used to reach seaborn as log base 1 and raise)
    fig = plot_label_stats({"keys": [f"k{i}" for i in range(3000)], "pids": (np.arange(3000) % 4).tolist()})
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_title() == "4 labels, 3000 images"
    plt.close(fig)
