"""Bad input on the data side (issue 12): deep PNGs, corrupt crops counted across DataLoader workers,
`keys.pkl` validated up front with the file named, stale temp folders of a killed toy generation."""
import io, os, pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lupnl.data import DataError, LMDBDataset, load_keys, write_lmdb
from lupnl.transforms import reid_test_transform
from lupnl.toy import toy_dataset

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
