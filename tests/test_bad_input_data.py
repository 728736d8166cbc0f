"""Bad input on the data side (issue 12): deep PNGs, corrupt crops counted across DataLoader workers,
`keys.pkl` validated up front with the file named, stale temp folders of a killed toy generation; and (issue 23) MOT files
and image folders that would be read wrong without a word: fractional or repeated track ids, symlinks out of a folder,
loose images beside identity folders, a training split evaluation does not need."""
import io, json, os, pickle, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lupnl.data import DataError, Item, LMDBDataset, load_keys, write_lmdb, read_benchmark, read_market1501, read_mars, write_lmdb_from_folder
from lupnl.transforms import reid_test_transform
from lupnl.toy import toy_dataset
from lupnl.tracks import read_mot

TINY = dict(n_ids=16, imgs_per_id=(6, 10), n_bench_ids=10, n_distractors=3, n_bench_junk=2)


def _png(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


# ---------------------------------------------------------------- images that decode silently wrong

def test_16bit_png_is_scaled_not_white(tmp_path):
    g = np.linspace(0, 65535, 32 * 16).reshape(32, 16).astype(np.uint16)
    root = write_lmdb(tmp_path / "db", [(_png(g), 1)], progress=False)
    a = np.asarray(LMDBDataset(root).image(0))
    assert a.shape == (32, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a[..., 1], np.round(g / 257).astype(np.uint8))
    assert abs(a.mean() - 127.5) < 2          # was ~254 (clipped at 255)
    assert a.min() == 0 and a.max() == 255


def _corrupt_lmdb(tmp_path, n=40, bad=(3, 11, 12, 20, 27, 35, 38, 39)):   # runs of 2, one wrapping to 0
    rng = np.random.default_rng(0)
    items = [(b"garbage" if i in bad else _png(rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)), i % 5)
             for i in range(n)]
    return write_lmdb(tmp_path / "bad", items, progress=False), len(bad)


@pytest.mark.parametrize("ctx", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])   # spawn: ~15 s of worker start-up
def test_skipped_counted_across_two_workers(tmp_path, ctx):
    root, n_bad = _corrupt_lmdb(tmp_path)
    ds = LMDBDataset(root, reid_test_transform((16, 8)))
    dl = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=ctx)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seen = sum(len(y) for _, y in dl)
        assert seen == len(ds) and ds.skipped == n_bad   # counted in the workers, read in the main process
        assert not ds.corrupt                            # the per-process set stays in the workers
        seen = sum(len(y) for _, y in dl)                # a second epoch: the counter keeps growing
    assert ds.skipped == 2 * n_bad
    assert LMDBDataset(root).skipped == 0                # per dataset object, from its creation


def test_skipped_in_the_main_process(tmp_path):
    root, n_bad = _corrupt_lmdb(tmp_path)
    ds = LMDBDataset(root)
    with pytest.warns(UserWarning, match="corrupt image"):
        for i in range(len(ds)): ds[i]
    assert ds.skipped == n_bad and len(ds.corrupt) == n_bad


# ---------------------------------------------------------------- keys.pkl validated up front, file named

def _keys(tmp_path, d, name="keys.pkl"):
    f = tmp_path / name
    with open(f, "wb") as fh: pickle.dump(d, fh)
    return f


@pytest.mark.parametrize("d, msg", [
    ({"keys": ["a", "b"], "pids": [1, 2], "true_pids": [1]}, "'true_pids' has 1 entries but 'keys' has 2"),
    ({"keys": ["a", "b"], "pids": [1, 2], "camids": [0, 1, 1]}, "'camids' has 3 entries"),
    ({"keys": ["a", "b"], "vids": [1]}, "'vids' has 1 entries"),
    ({"keys": [0, 1], "pids": [1, 2]}, "key 0 (0) is a int, not a str or bytes"),
    ({"keys": ["ok", "naïve"], "pids": [1, 2]}, "key 1 ('naïve') is not ASCII"),
    ({"keys": ["a", ""], "pids": [1, 2]}, "key 1 ('') is empty"),
    ({"keys": ["a", "b"], "pids": [1.0, 2.7]}, "'pids' holds non-integer numbers (item 1: 2.7)"),
    ({"keys": ["a", "b"], "pids": np.array([1, np.nan])}, "'pids' holds non-integer numbers (item 1: nan)"),
    ({"keys": ["a", "b"], "pids": [1, 2], "true_pids": [0.5, 1]}, "'true_pids' holds non-integer numbers"),
    ({"keys": ["a", "b"], "pids": ["x", "y"]}, "'pids' must hold integers"),
])
def test_keys_validation_names_the_file(tmp_path, d, msg):
    f = _keys(tmp_path, d, "my_keys.pkl")
    with pytest.raises(DataError) as e: load_keys(f)
    assert str(f) in str(e.value) and msg in str(e.value)


def test_keys_validation_accepts_good_files(tmp_path):
    d = load_keys(_keys(tmp_path, {"keys": np.array([b"a", b"b"]), "pids": np.array([3.0, 4.0]), "labels": ["v_1", "v_2"]}))
    assert list(d["pids"]) == [3, 4]
    assert load_keys(_keys(tmp_path, {"keys": ("a", "b"), "vids": np.array([1, 2], np.int32)}, "b.pkl"))["vids"].dtype == np.int32


def test_dataset_refuses_float_pids_instead_of_truncating(tmp_path):
    root = write_lmdb(tmp_path / "db", [(_png(np.zeros((4, 4, 3), np.uint8)), 1)] * 2, progress=False)
    _keys(root, {"keys": ["000000000", "000000001"], "pids": [1.9, 2.2]})
    with pytest.raises(DataError, match=r"keys\.pkl: 'pids' holds non-integer numbers"): LMDBDataset(root)


# ---------------------------------------------------------------- stale temp folders of a killed generation

def test_toy_dataset_removes_stale_temp_folders(tmp_path):
    root = tmp_path / "toy"
    dead = tmp_path / ".toy.tmp-999999999-deadbeef"          # no such pid: a killed run's leftovers
    (dead / "lupnl_nl").mkdir(parents=True)
    (dead / "lupnl_nl" / "data.mdb").write_bytes(b"x" * 1000)
    old = tmp_path / ".toy.old-0123abcd"
    old.mkdir()
    live = tmp_path / f".toy.tmp-{os.getpid()}-cafecafe"     # a live process's folder is left alone
    live.mkdir()
    other = tmp_path / ".other.tmp-999999999-deadbeef"       # another dataset's folder too
    other.mkdir()
    toy_dataset(root, progress=False, **TINY)
    assert not dead.exists() and not old.exists() and live.exists() and other.exists()
    assert (root / "toy.json").exists()


# ---------------------------------------------------------------- MOT files read wrong without a word (issue 23)


def _mot(tmp_path, text, name="gt.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, msg", [
    ("1,7,1,1,5,5\n2,7,1,1,5,5\n\n3,110.7,1,1,5,5\n", "line 4: the id 110.7 is not a whole number"),
    ("1,7,1,1,5,5\n1.5,8,1,1,5,5\n", "line 2: the frame 1.5 is not a whole number"),
    ("1,7,1,1,5,5,1,1,1\n2,7,1,1,5,5,1,2.5,1\n", "line 2: the class 2.5 is not a whole number"),
    ("1,7,1,1,5,5\n\n2,7,1,1,5,5\n1,7,9,9,5,5\n", "line 4: duplicate (frame, id) = (1, 7), first on line 1"),
    ("1,7,1,1,5,5\r\n2,7,1,1,nan,5\r\n", "line 2 has an empty, NaN or infinite w (column 5)"),
    ("1,7,1,1,5,5\n2,7,,1,5,5\n", "line 2 has an empty, NaN or infinite x (column 3)"),
    ("1,7,1,1,5,5,1,,1\n", "line 1 has an empty, NaN or infinite class (column 8)"),
])
def test_read_mot_refuses_what_it_would_read_wrong(tmp_path, text, msg):
    "Fractional frames / ids are refused, not truncated; a track's box given twice in a frame and NaNs name the 1-based line."
    p = _mot(tmp_path, text, "tracker_out.txt")
    with pytest.raises(DataError) as e: read_mot(p)
    assert str(e.value).startswith(f"{p}: ") and msg in str(e.value), str(e.value)


def test_read_mot_still_reads_detections_and_whole_floats(tmp_path):
    "id -1 (detections without a track) may repeat in a frame; 2.0 is a whole number; the NaN message keeps its start."
    det = read_mot(_mot(tmp_path, "1,-1,1,1,5,5,0.9,-1,-1,-1\n1,-1,2,2,5,5,0.8,-1,-1,-1\n2,-1,1,1,5,5,0.7,-1,-1,-1\n", "det.txt"))
    assert det.id.tolist() == [-1, -1, -1] and det.frame.tolist() == [1, 1, 2]
    gt = read_mot(_mot(tmp_path, "1.0,3.0,1,1,5,5\n2,3,1,1,5,5\n"))
    assert gt.frame.tolist() == [1, 2] and gt.id.tolist() == [3, 3] and gt.frame.dtype == np.int64
    with pytest.raises(DataError, match=r"bad.txt: expected >= 6 numeric .*line 1 has an empty"):
        read_mot(_mot(tmp_path, "1,2,3,4,,6\n", "bad.txt"))


# ---------------------------------------------------------------- folder readers: symlinks out, loose images (issue 23)


def _img(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(np.random.default_rng(seed).integers(0, 256, (16, 8, 3), dtype=np.uint8)))
    return path


def _left_out(fn, *args, **kw):
    "`(result, messages of the warnings)` of `fn(*args, **kw)`."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(x.message) for x in w]


@pytest.mark.parametrize("layout", ["subfolders", "flat"])
def test_write_lmdb_from_folder_skips_symlinks_out_of_the_folder(tmp_path, layout):
    "Done-when of issue 23: a symlink to a file outside the folder writes no byte of that file; links inside are kept."
    secret = _img(tmp_path / "private" / "secret.png", 1)
    src = tmp_path / "crops"
    if layout == "subfolders":
        _img(src / "0001" / "a.png", 2)
        (src / "0001" / "b.png").symlink_to(secret)                 # a file out of the folder
        (src / "0002").symlink_to(secret.parent, target_is_directory=True)   # a folder out of it
        (src / "0001" / "c.png").symlink_to(src / "0001" / "a.png")  # inside: kept
        links, kept = 2, ["0001/a.png", "0001/c.png"]
    else:
        _img(src / "0001_c1_a.png", 2)
        (src / "0001_c2_b.png").symlink_to(secret)
        links, kept = 1, ["0001_c1_a.png"]
    out, msgs = _left_out(write_lmdb_from_folder, src, tmp_path / "lmdb", progress=False)
    ds = LMDBDataset(out)
    assert ds.meta["files"] == kept
    assert secret.read_bytes() not in (out / "data.mdb").read_bytes()
    assert len(msgs) == 1 and f"skipped {links} symlink(s) whose target lies outside {src}" in msgs[0]


def test_write_lmdb_from_folder_counts_loose_images(tmp_path):
    src = tmp_path / "crops"
    for j in range(3): _img(src / "7" / f"{j}.png", j)
    _img(src / "stray.png", 5); _img(src / "7_also.jpg", 6)         # beside the label folders: not read
    (src / "notes.txt").write_text("not an image")
    out, msgs = _left_out(write_lmdb_from_folder, src, tmp_path / "lmdb", progress=False)
    assert len(LMDBDataset(out)) == 3
    assert len(msgs) == 1 and "ignored 2 loose image file(s) beside the identity subfolders" in msgs[0] and str(src) in msgs[0]
    _, msgs = _left_out(write_lmdb_from_folder, src / "7", tmp_path / "lmdb2", progress=False)   # flat, nothing left out
    assert msgs == []


def _market(root, train=True):
    for s, names in (("bounding_box_train", ["0001_c1s1_000001_00.jpg", "0001_c2s1_000002_00.jpg"] if train else []),
                     ("query", ["0005_c1s1_000003_00.jpg"]), ("bounding_box_test", ["0005_c2s1_000004_00.jpg", "0006_c1s1_000005_00.jpg"])):
        for j, n in enumerate(names): _img(root / s / n, j)
    return root


def test_benchmark_readers_skip_symlinks_out_of_the_benchmark(tmp_path):
    root = _market(tmp_path / "market")
    outside = _img(tmp_path / "elsewhere" / "0005_c3s1_000009_00.jpg", 9)
    (root / "bounding_box_test" / outside.name).symlink_to(outside)
    (root / "query" / "0006_c2s1_000010_00.jpg").symlink_to(root / "bounding_box_test" / "0006_c1s1_000005_00.jpg")  # inside
    b, msgs = _left_out(read_benchmark, root)
    assert [Path(i.path).name for i in b.gallery] == ["0005_c2s1_000004_00.jpg", "0006_c1s1_000005_00.jpg"]
    assert len(b.query) == 2 and len(b.train) == 2
    assert len(msgs) == 1 and "bounding_box_test: skipped 1 symlink(s)" in msgs[0]


def test_mars_reader_skips_symlinked_folders_and_counts_loose_frames(tmp_path):
    root = tmp_path / "mars"
    for pid in ("0001", "0002"): _img(root / "bbox_train" / pid / f"{pid}C1T0001F001.jpg", int(pid))
    _img(root / "bbox_train" / "0003C1T0001F001.jpg", 3)             # a loose frame beside the <pid>/ folders
    _img(tmp_path / "other" / "0009" / "0009C1T0001F001.jpg", 4)
    (root / "bbox_train" / "0009").symlink_to(tmp_path / "other" / "0009", target_is_directory=True)
    (root / "gtPepper").mkdir()
    for split in ("query", "gallery"):
        (root / "gtPepper" / f"{split}.json").write_text(json.dumps([{"pid": 1, "camid": 0, "img_paths": ["bbox_train/0001/0001C1T0001F001.jpg"]}]))
    b, msgs = _left_out(read_mars, root)
    assert [i.pid for i in b.train] == [1, 2]
    assert len(msgs) == 1 and "skipped 1 symlink(s)" in msgs[0] and "ignored 1 loose image file(s)" in msgs[0]


def test_evaluation_needs_no_training_split(tmp_path):
    "read_benchmark(train=False) reads a Market layout without bounding_box_train; fine-tuning still requires it (same message)."
    root = _market(tmp_path / "market", train=False)
    b = read_benchmark(root, train=False)
    assert (b.name, len(b.train), len(b.query), len(b.gallery)) == ("market1501", 0, 1, 2)
    assert read_market1501(root, train=False).gallery == b.gallery
    with pytest.raises(DataError, match=r"unknown benchmark layout \(expected bounding_box_train/, labeled/, bbox_train/ or list_\*.txt\)$"):
        read_benchmark(root)
    from lupnl.finetune import FinetuneConfig, load_benchmark
    with pytest.raises(DataError, match="unknown benchmark layout"): load_benchmark(FinetuneConfig(data=str(root)))
    with pytest.raises(DataError, match="benchmark folder not found: .*bounding_box_train"): read_market1501(root)


def test_real_benchmarks_without_the_training_split(shared_data):
    "train=False gives the same query / gallery items (and pids) on the real benchmarks, with an empty train."
    for name in ("market1501-pepper-mini", "cuhk03-labeled-pair1", "mars-pepper-mini"):
        full, test_only = read_benchmark(shared_data / name), read_benchmark(shared_data / name, train=False)
        assert test_only.train == [] and test_only.query == full.query and test_only.gallery == full.gallery, name


# ---------------------------------------------------------------- benchmark images handled like LMDB crops (issue 23)

def png_header(w, h):
    "The first bytes of a w×h RGB PNG (signature, IHDR, IEND): what PIL reads to learn the size, a few dozen bytes for any size."
    import struct, zlib
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _bench_items(tmp_path, bad):
    "12 images of 3 identities (`<pid>_<k>.png`); those in `bad` (index -> bytes) hold those bytes instead."
    rng = np.random.default_rng(0)
    items = []
    for i in range(12):
        p = tmp_path / f"{i // 4}_{i % 4}.png"
        p.write_bytes(bad[i] if i in bad else _png(rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)))
        items.append(Item(str(p), i // 4, i % 2))
    return items


@pytest.mark.parametrize("data,msg", [(png_header(20000, 20000), "is far over lupnl.data.MAX_IMAGE_SIDE = 4096 px"),
                                      (png_header(5000, 3000), "is 5000x3000 px, over lupnl.data.MAX_IMAGE_SIDE = 4096 px"),
                                      (b"", "corrupt image"), (b"garbage", "corrupt image")],
                         ids=["20000x20000", "5000x3000", "zero_bytes", "garbage"])
def test_benchmark_image_too_large_or_unreadable(tmp_path, data, msg):
    "Before: a 20000x20000 image was decoded (gigabytes) or failed mid-epoch; a zero-byte one failed mid-epoch. Now refused from its header, named."
    from lupnl.data import ImageDataset, CorruptImageError, MAX_IMAGE_SIDE
    assert MAX_IMAGE_SIDE == 4096
    items = _bench_items(tmp_path, {5: data})
    with pytest.raises(CorruptImageError, match=msg) as e: ImageDataset(items)[5]           # 'raise': the default
    assert items[5].path in str(e.value)
    with pytest.warns(UserWarning, match=msg):
        img, label, camid = ImageDataset(items, on_corrupt="skip")[5]   # another image of identity 1 in its place
    assert label == 1 and np.asarray(img).shape == (16, 8, 3)


def test_benchmark_images_skipped_and_counted_across_workers(tmp_path):
    "'skip' (training): each bad image requested is counted, across 2 DataLoader workers, as LMDBDataset counts; 'drop' marks them."
    from lupnl.data import ImageDataset
    bad = {1: b"", 6: b"garbage", 11: png_header(5000, 10)}
    items = _bench_items(tmp_path, bad)
    train = ImageDataset(items, reid_test_transform((16, 8)), relabel=True, on_corrupt="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = torch.cat([y for _, y, _ in DataLoader(train, batch_size=4, num_workers=2)])
        assert train.skipped == 3 and labels.tolist() == [i // 4 for i in range(12)]   # substitutes of the same identity
        ok = torch.cat([b[3] for b in DataLoader(ImageDataset(items, reid_test_transform((16, 8)), on_corrupt="drop"), batch_size=5)])
    assert ok.tolist() == [i not in bad for i in range(12)]


def test_a_split_that_cannot_be_read_is_refused_up_front(tmp_path):
    from lupnl.data import ImageDataset
    items = _bench_items(tmp_path, {i: b"garbage" for i in range(12)})
    for mode in ("skip", "drop"):
        with pytest.raises(DataError, match=f"{tmp_path}: none of its 12 images can be read \\(the first: corrupt image "):
            ImageDataset(items, on_corrupt=mode)
        with pytest.raises(DataError, match="no images"): ImageDataset([], on_corrupt=mode)
