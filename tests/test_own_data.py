"""Issue 22: pre-training on your own crops. `--data` takes a folder of crops (converted once into a cached LMDB), every job
names its data and benchmark with their sizes first, and pre-training on your data without `--bench` warns that retrieval is
scored on the built-in cartoons."""
import os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crops(data_home, tmp_path_factory):
    "20 identities x 4 crops of the built-in data as JPEG files, one subfolder per identity."
    from lupnl.data import LMDBDataset
    from lupnl.toy import toy_dataset
    ds = LMDBDataset(toy_dataset(data_home / "toy", progress=False).lmdb)
    out = tmp_path_factory.mktemp("own") / "my_crops"
    pids = [p for p in ds.classes if (ds.labels == p).sum() >= 4][:20]
    for pid in pids:
        (out / f"person{pid:04d}").mkdir(parents=True)
        for i in np.flatnonzero(ds.labels == pid)[:4]: ds.image(int(i)).save(out / f"person{pid:04d}" / f"{i}.jpg", quality=90)
    return out


def pretrain(env, *args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "lupnl.pretrain", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_pretrain_on_a_folder_of_crops(crops, env, data_home, tmp_path):
    "`--data FOLDER_OF_CROPS --epochs 1` trains: the folder is converted once (one line), the header names data and benchmark, and warns."
    small = ["--epochs", 1, "--batch_size", 16, "--img_size", "32x16", "--eval_every", 0, "--monitor_size", 64]
    res = pretrain(env, "--data", crops, "--out_dir", tmp_path / "run", *small)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout.splitlines()
    cached = next(data_home.glob("folders/my_crops-*"))
    assert out[0] == f"{crops}: 80 crops, converted once into the LMDB {cached} (reused while they are unchanged)", out[:3]
    assert out[1] == f"data: {crops} (LMDB {cached}): 80 images, 20 labels", out[:3]
    assert out[2].startswith(f"benchmark: built-in ({data_home / 'toy' / 'market'}): 100 queries, ") and "gallery images" in out[2]
    assert [l for l in res.stderr.splitlines() if l.startswith("WARNING")] == [
        "WARNING: retrieval (mAP, rank-1) is scored on the built-in cartoon benchmark, not on anything like your data: "
        "pass --bench FOLDER (Market-1501 layout) to score it on yours"]
    assert (tmp_path / "run" / "backbone.safetensors").is_file() and "mAP=" in res.stdout
    # next time: the cached LMDB, not a second conversion; with --bench, no warning
    bench = data_home / "toy" / "market"
    again = pretrain(env, "--data", crops, "--bench", bench, "--out_dir", tmp_path / "again", *small)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == f"{crops}: 80 crops, read from their LMDB {cached} (converted before)"
    assert again.stdout.splitlines()[2].startswith(f"benchmark: {bench}: 100 queries") and "WARNING" not in again.stderr
    assert len(list(data_home.glob("folders/*"))) == 1


def test_crops_folder_converts_once(crops, tmp_path, capsys):
    "`lupnl.data.crops_lmdb`: one conversion per folder content, reused, under $LUPNL_DATA/folders by default."
    from lupnl.data import LMDBDataset, crops_lmdb
    db = crops_lmdb(crops, tmp_path, progress=False)
    assert db.parent == tmp_path and db.name.startswith("my_crops-") and capsys.readouterr().out == ""
    ds = LMDBDataset(db)
    assert (len(ds), ds.num_classes, len(set(ds.meta["label_names"]))) == (80, 20, 20)
    assert crops_lmdb(crops, tmp_path) == db and "read from their LMDB" in capsys.readouterr().out
    assert crops_lmdb(db) == db                                           # an LMDB: itself


def test_a_folder_that_is_neither_says_how_to_convert(env, tmp_path):
    "A folder with neither keys.pkl nor crops: the usual one-line error, exit 2, plus a hint naming write_lmdb_from_folder."
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    res = pretrain(env, "--data", tmp_path / "notes", "--out_dir", tmp_path / "run")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"keys file not found: {tmp_path / 'notes' / 'keys.pkl'}" in res.stderr
    assert "lupnl.data.write_lmdb_from_folder" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_finetune_header_names_its_data(ft_finished):
    "Fine-tuning's first line names its data (the path, or built-in) and the sizes."
    first = (Path(ft_finished.out_dir) / "log.txt").read_text().splitlines()[0]
    assert first.startswith("data: built-in (market1501): train ") and ", query " in first and ", gallery " in first, first
