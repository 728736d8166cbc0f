"""lupnl.explore (with lupnl.noise and lupnl.tracks) on real data and the built-in toy dataset: noise report,
simulator rates, MOT17 cropping, benchmark statistics, sampling bounds. Expected values are computed independently of lupnl.explore where possible."""
import csv, json, pickle, shutil, sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lupnl.data import LMDBDataset, load_keys, read_benchmark
from lupnl.noise import compare_labelings, label_owners, noise_report, purity, simulate_noise
from lupnl.toy import toy_dataset
from lupnl.explore import image_sizes, label_stats, plot_summary, sample_grid, benchmark_stats
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
        assert c["precision"] == pytest.approx((changed & ok_a).sum() / changed.sum())
        assert c["recall"] == pytest.approx((wrong & ok_a).sum() / wrong.sum())
        assert c["purity_before"] == pytest.approx(ok_b[real].mean())
        own_a = _brute_owner(after.tolist(), true.tolist())
        assert c["purity_after"] == pytest.approx(np.mean([own_a.get(l) == t for l, t in zip(after[real], true[real])]))
    with pytest.raises(ValueError, match="one length"): compare_labelings([1, 2], [1, 2], [1])


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
