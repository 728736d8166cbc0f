"""End-to-end tests of lupnl.pretrain: the papermill run with defaults, kill-and-resume, 2-process DDP on CPU (gloo)."""
import json, math, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from lupnl.data import LMDBDataset, toy_dataset, write_lmdb
from lupnl.pretrain import PretrainConfig, config_args, load_checkpoint, read_metrics, torchrun_command

REPO = Path(__file__).resolve().parents[1]
# Every run of this file uses its own data folder, so the papermill run below generates the built-in data
# (its time limit includes that). OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin-wait slow torch down
# tenfold when the 2 cores are shared with other processes; it changes nothing on an idle machine.
EXPECTED_KEYS = {"epoch", "lr", "loss", "loss_cls", "loss_proto", "loss_inst", "acc_inst", "acc_cls", "epoch_time",
                 "corrected", "purity_before", "purity", "precision", "recall"}


@pytest.fixture(scope="session")
def data_home(tmp_path_factory):
    "LUPNL_DATA for the runs of this file: a fresh folder (the first run generates the toy data in it)."
    return tmp_path_factory.mktemp("lupnl_data")


@pytest.fixture(scope="session")
def env(data_home):
    return dict(os.environ, LUPNL_DATA=str(data_home), OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1",
                MPLBACKEND="Agg")


@pytest.fixture(scope="session")
def tiny_lmdb(data_home, tmp_path_factory):
    "The first 128 crops of the toy data (about 9 identities) as their own LUPerson-NL LMDB (noisy pids + true_pids)."
    toy = toy_dataset(data_home / "toy", progress=False)
    ds = LMDBDataset(toy.lmdb)
    n = 128
    out = tmp_path_factory.mktemp("tiny") / "lmdb"
    write_lmdb(out, ((ds.read_bytes(i), int(ds.labels[i])) for i in range(n)), progress=False,
               extra={"true_pids": list(ds.meta["true_pids"][:n])})
    return out


@pytest.fixture(scope="session")
def tiny_bench(data_home, tmp_path_factory):
    "The built-in benchmark cut to 12 test identities (their queries and gallery images) and a few train images."
    bench = toy_dataset(data_home / "toy", progress=False).bench
    out = tmp_path_factory.mktemp("tiny_bench")
    pids = sorted({f.name.split("_")[0] for f in (bench / "query").glob("*.jpg")})[:12]
    for sub, keep in (("query", pids), ("bounding_box_test", pids), ("bounding_box_train", None)):
        files = sorted((bench / sub).glob("*.jpg"))
        files = [f for f in files if f.name.split("_")[0] in keep] if keep else files[:20]
        (out / sub).mkdir()
        for f in files: shutil.copy(f, out / sub / f.name)
    return out


def tiny_config(data, bench, out_dir, epochs, **kwargs):
    "A run of seconds per epoch on `tiny_lmdb` / `tiny_bench`: 32x16 crops, global batch 16, correction and label guidance from epoch 1."
    return PretrainConfig(**{**dict(data=str(data), bench=str(bench), out_dir=str(out_dir), epochs=epochs, batch_size=16,
                                    img_size=(32, 16), lr=0.03, lr_steps=(), queue_size=64, correct_start=1,
                                    label_guided_start=1, eval_every=0), **kwargs})


def check_backbone(path, arch="resnet18"):
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = getattr(torchvision.models, arch)(weights=None)
    res = net.load_state_dict(state, strict=False)
    assert set(res.missing_keys) == {"fc.weight", "fc.bias"} and not res.unexpected_keys


def test_parameters_cell_is_the_config():
    "The papermill parameters of nbs/03_pretrain.ipynb are exactly the fields of PretrainConfig, with its defaults."
    from dataclasses import asdict
    nb = json.loads((REPO / "nbs" / "03_pretrain.ipynb").read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1
    params = {}
    exec("".join(cells[0]["source"]), params)
    params.pop("__builtins__")
    assert params == asdict(PretrainConfig())


def test_papermill_defaults(tmp_path, env):
    "The README's main command: papermill with default parameters, built-in data generated from scratch, <= 5 min."
    out = tmp_path / "run"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "papermill", "nbs/03_pretrain.ipynb", str(tmp_path / "out.ipynb"),
                    "-p", "out_dir", str(out), "--log-level", "WARNING"], cwd=REPO, env=env, check=True)
    minutes = (time.time() - t0) / 60
    print(f"papermill with defaults (including generating the toy data): {minutes:.2f} min")
    assert minutes <= 5, f"papermill with defaults took {minutes:.2f} min (limit 5)"
    assert (Path(env["LUPNL_DATA"]) / "toy" / "toy.json").exists()    # it generated the built-in data
    rows = read_metrics(out)
    cfg = PretrainConfig()
    assert [r["epoch"] for r in rows] == list(range(cfg.epochs))
    for r in rows:
        assert EXPECTED_KEYS <= set(r), EXPECTED_KEYS - set(r)
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_cls", "loss_proto", "loss_inst"))
    assert {"mAP", "rank1"} <= set(rows[-1]) and 0 < rows[-1]["mAP"] <= 100
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == cfg.epochs and ckpt["config"]["out_dir"] == str(out)
    check_backbone(out / "backbone.pth", cfg.arch)
    assert (out / "metrics.png").stat().st_size > 0


def test_kill_and_resume(tmp_path, env, tiny_lmdb, tiny_bench):
    "SIGKILL a run right after its first checkpoint; running it again resumes there and replays the uninterrupted run."
    epochs = 3
    cmd = [sys.executable, "-m", "lupnl.pretrain"]
    out = tmp_path / "killed"
    args = config_args(tiny_config(tiny_lmdb, tiny_bench, out, epochs))
    proc = subprocess.Popen(cmd + args, env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint.pth").exists():
            assert proc.poll() is None, f"run ended (rc {proc.returncode}) before writing a checkpoint"
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
    finally: proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_at = load_checkpoint(out / "checkpoint.pth")["epoch"]
    assert 1 <= resumed_at < epochs, resumed_at
    before = read_metrics(out)
    assert not (out / "backbone.pth").exists()

    res = subprocess.run(cmd + args, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint.pth'} at epoch {resumed_at}" in res.stdout
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(epochs))          # continues, no duplicate epochs
    assert rows[:resumed_at] == [r for r in before if r["epoch"] < resumed_at]
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == epochs
    check_backbone(out / "backbone.pth")

    # every epoch reseeds from (seed, epoch, rank): the resumed run replays an uninterrupted one
    straight = tmp_path / "straight"
    subprocess.run(cmd + config_args(tiny_config(tiny_lmdb, tiny_bench, straight, epochs)), env=env, cwd=tmp_path, check=True,
                   capture_output=True)
    ref = read_metrics(straight)
    for a, b in zip(rows, ref):
        for k in ("loss", "loss_cls", "loss_inst", "loss_proto", "corrected", "mAP"):
            if k in b: assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["epoch"], k, a[k], b[k])


def test_ddp_two_processes_gloo(tmp_path, env, tiny_lmdb, tiny_bench):
    "torchrun with 2 CPU processes (gloo): completes; queue, prototypes, labels and weights agree across ranks; it learns."
    out, epochs = tmp_path / "ddp", 3
    cmd = torchrun_command(tiny_config(tiny_lmdb, tiny_bench, out, epochs, queue_size=40, dump_state=True), 2)
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    s0, s1 = (torch.load(out / f"state_rank{r}.pth", weights_only=True) for r in (0, 1))
    m0, m1 = s0["model"], s1["model"]
    for k in ("queue", "queue_labels", "queue_ptr", "prototypes"):
        assert torch.equal(m0[k], m1[k]), f"{k} differs across ranks"
    steps = 128 // 16                                                   # per epoch: 8 images per rank and step
    assert int(m0["queue_ptr"]) == (epochs * steps * 16) % 40          # each step enqueued both ranks' 8 keys
    assert (m0["queue_labels"] >= 0).all() and m0["prototypes"].norm(dim=1).gt(0).any()
    assert torch.equal(s0["labels"], s1["labels"])
    params = [k for k in m0 if "encoder_q" in k and "running" not in k and "num_batches" not in k]
    assert params and all(torch.equal(m0[k], m1[k]) for k in params), "query-encoder weights differ across ranks"
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(epochs))           # written once per epoch: by rank 0 only
    assert res.stdout.count(f"epoch={epochs - 1} ") == 1
    assert rows[-1]["loss_cls"] < rows[0]["loss_cls"] and rows[-1]["acc_cls"] > rows[0]["acc_cls"]
    check_backbone(out / "backbone.pth")
