"""Bad input and bad luck for the two jobs (issue 12): resume of another run, two runs in one out_dir, full disks,
temporary files of killed runs, a frozen DDP rank, skipped corrupt images, late or anonymous errors, and every
lupnl checkpoint as fine-tuning `init`. Each test names the message a user sees."""
import errno, json, os, signal, subprocess, sys, time, warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lupnl.runs as runs
import lupnl.checkpoints as checkpoints
from lupnl.data import LMDBDataset, write_lmdb
from lupnl.pretrain import PretrainConfig, torchrun_command, train
from lupnl.runs import config_args, read_metrics
from lupnl.checkpoints import load_checkpoint

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


# The finished runs `finished` (pre-training) and `ft_finished` (BoT fine-tuning) are session fixtures in conftest.py,
# shared with test_pretrain.py and test_finetune.py: the resume tests copy them.

def copy_run(cfg, dest):
    "A copy of `cfg`'s out_dir at `dest` (checkpoint and log) and the config pointing there."
    import shutil
    shutil.copytree(cfg.out_dir, dest)
    return replace(cfg, out_dir=str(dest))


# ---------------------------------------------------------------- 1. resume refuses another run

@pytest.mark.parametrize("change", [dict(lr=0.05), dict(seed=1), dict(temperature=0.2), dict(arch="resnet34")])
def test_resume_refuses_changed_config(finished, tmp_path, change):
    cfg = copy_run(finished, tmp_path / "run")
    with pytest.raises(ValueError) as e:
        train(replace(cfg, epochs=2, **change))
    msg = str(e.value)
    name, value = next(iter(change.items()))
    assert f"cannot resume from {Path(cfg.out_dir) / 'checkpoint.pth'}" in msg
    saved = load_checkpoint(Path(cfg.out_dir) / "checkpoint.pth")["config"][name]   # what the run used (a preset's value for None)
    assert getattr(finished, name) in (saved, None) and saved != value
    assert f"{name}: {saved!r} in the checkpoint, {value!r} now" in msg
    assert "--resume never" in msg and "epochs" in msg.split("may change on resume")[1]
    assert [r["epoch"] for r in read_metrics(cfg.out_dir)] == [0]          # nothing was trained or logged


def test_resume_may_extend_epochs(finished, tmp_path):
    "More epochs (step schedule: the lr of the epochs done is unchanged), another eval cadence: accepted and continued."
    cfg = copy_run(finished, tmp_path / "run")
    rows = train(replace(cfg, epochs=2, eval_every=1, workers=0))
    assert [r["epoch"] for r in rows] == [0, 1]
    assert load_checkpoint(Path(cfg.out_dir) / "checkpoint.pth")["config"]["epochs"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator   # issue 22: TensorBoard follows
    acc = EventAccumulator(cfg.out_dir); acc.Reload()                                     # (a second event file)
    assert [e.step for e in acc.Scalars("loss")] == [0, 1] and [i.step for i in acc.Images("metrics")] == [0, 1]


def test_resume_refuses_cosine_with_other_epochs(tiny_lmdb, tiny_bench, tmp_path, tiny_config):
    cfg = tiny_config(tiny_lmdb, tiny_bench, tmp_path / "cos", 1, schedule="cosine")
    train(cfg)
    with pytest.raises(ValueError, match="cosine schedule depends on epochs"):
        train(replace(cfg, epochs=2))


def test_resume_refuses_other_data_of_the_same_size(finished, tiny_lmdb, tmp_path):
    "Another LMDB with as many images (labels shifted): refused by the data fingerprint."
    ds = LMDBDataset(tiny_lmdb)
    other = tmp_path / "other_lmdb"
    write_lmdb(other, ((ds.read_bytes(i), int(ds.labels[(i + 1) % len(ds)])) for i in range(len(ds))), progress=False,
               extra={"true_pids": list(ds.meta["true_pids"])})
    cfg = copy_run(finished, tmp_path / "run")
    with pytest.raises(ValueError) as e:
        train(replace(cfg, data=str(other), epochs=2))
    assert "data: {'images': 128" in str(e.value) and "keys_sha256" in str(e.value)


# ---------------------------------------------------------------- 2. one run per out_dir

def test_second_run_into_the_same_out_dir_stops_at_once(tmp_path, tiny_lmdb, tiny_bench, env, tiny_config):
    out = tmp_path / "run"
    lock = runs.open_out_dir(out)                  # this process is "the first run"
    try:
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "lupnl.pretrain", *config_args(tiny_config(tiny_lmdb, tiny_bench, out, 1))],
                             env=env, capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode != 0
        assert f"{out} is in use by another run (pid {os.getpid()} on" in res.stderr, res.stderr[-2000:]
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pth").exists()
        print(f"second run refused after {time.time() - t0:.1f} s (including the interpreter and torch import)")
    finally:
        lock.close()


def test_lock_is_released_by_kill_9(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"from lupnl.runs import open_out_dir; l = open_out_dir({str(out)!r}); "
                               "print('locked', flush=True); import time; time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=f"pid {holder.pid} on"):
            runs.open_out_dir(out)
    finally:
        holder.kill(); holder.wait()
    runs.open_out_dir(out).close()                  # no stale lock to remove by hand


# ---------------------------------------------------------------- 3, 4. full disks, torn logs, temporary files

def test_full_disk_checkpoint_write(tmp_path, monkeypatch):
    "torch.save fails half-way with ENOSPC: the temporary file is removed, the error names the path and the reason."
    path = tmp_path / "checkpoint.pth"
    checkpoints.save_checkpoint(dict(epoch=1), path)
    real_save = torch.save
    def full_disk(obj, f, *a, **k):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        checkpoints.save_checkpoint(dict(epoch=2), path)
    assert e.value.errno == errno.ENOSPC
    assert f"cannot write checkpoint {path}: no space left on device" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoints.load_checkpoint(path)["epoch"] == 1  # the previous checkpoint is intact


def test_full_disk_in_a_run_then_resume(finished, tmp_path, monkeypatch):
    "A run whose checkpoint write hits a full disk fails naming the file; the next run starts clean and resumes."
    cfg = copy_run(finished, tmp_path / "run")
    real = checkpoints.atomic_write   # lupnl.checkpoints writes checkpoints through lupnl.runs.atomic_write
    def failing(path, write, what="file"):
        if Path(path).name == "checkpoint.pth":
            return real(path, lambda f: (f.write(b"partial"), (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))), what)
        return real(path, write, what)
    monkeypatch.setattr(checkpoints, "atomic_write", failing)
    with pytest.raises(OSError, match="no space left on device"):
        train(replace(cfg, epochs=2))
    monkeypatch.setattr(checkpoints, "atomic_write", real)
    assert not list(Path(cfg.out_dir).glob("*.tmp*"))
    with open(Path(cfg.out_dir) / "metrics.jsonl", "a") as f: f.write('{"epoch": 1, "lr": 0.0')   # and a torn row
    with pytest.warns(UserWarning, match=r"metrics.jsonl, line 3: torn last line"):
        rows = train(replace(cfg, epochs=2))
    assert [r["epoch"] for r in rows] == [0, 1]


def test_metrics_json_error_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1, oops}\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not valid JSON"):
        runs.read_metrics(tmp_path)


def test_stale_temporary_files_removed_at_start(finished, tmp_path, capsys):
    "Temporary files of killed runs (dead pids) go at the next start; a live process's are kept."
    cfg = copy_run(finished, tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    out = Path(cfg.out_dir)
    (out / f"checkpoint.pth.tmp{dead}").write_bytes(b"x" * 10000)
    (out / f"backbone.pth.tmp{dead}").write_bytes(b"x" * 10000)
    (out / f"checkpoint.pth.tmp{os.getppid()}").write_bytes(b"live")
    train(replace(cfg, epochs=2))
    assert sorted(p.name for p in out.glob("*.tmp*")) == [f"checkpoint.pth.tmp{os.getppid()}"]
    assert f"removed 2 temporary file(s) of interrupted runs" in capsys.readouterr().out


# ---------------------------------------------------------------- 7. validation before the first epoch

@pytest.mark.parametrize("flag,value,msg", [("--lr", "-1e-3", "PretrainConfig.lr must be > 0, not -0.001"),
                                            ("--threshold", "1.5", "threshold must be in [0, 1]"),
                                            ("--queue_size", "0", "queue_size must be in [1, inf]"),
                                            ("--preset", "pnll", "invalid choice: 'pnll'")])
def test_config_ranges_on_the_command_line(flag, value, msg):
    res = subprocess.run([sys.executable, "-m", "lupnl.pretrain", flag, value], capture_output=True, text=True)
    assert res.returncode != 0 and msg in res.stderr, res.stderr[-1500:]


def test_unwritable_out_dir_fails_before_training(tmp_path, tiny_lmdb, tiny_bench, tiny_config):
    "An out_dir that cannot be written fails at once, naming it (before data is read or an epoch trained)."
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match=f"cannot create or write out_dir {tmp_path / 'a_file' / 'run'}: not a directory"):
        train(tiny_config(tiny_lmdb, tiny_bench, tmp_path / "a_file" / "run", 1))
    if os.geteuid() == 0: return                                     # root writes everywhere
    ro = tmp_path / "ro"
    ro.mkdir(); ro.chmod(0o500)
    try:
        with pytest.raises(OSError, match=f"cannot create or write out_dir {ro / 'run'}: permission denied"):
            train(tiny_config(tiny_lmdb, tiny_bench, ro / "run", 1))
    finally: ro.chmod(0o700)


def test_zero_byte_checkpoint(finished, tmp_path):
    cfg = copy_run(finished, tmp_path / "run")
    (Path(cfg.out_dir) / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"checkpoint .*checkpoint.pth is empty \(0 bytes\).*--resume never"):
        train(cfg)


def test_state_dict_mismatch_on_resume_names_checkpoint(finished, tmp_path):
    "A checkpoint whose weights do not fit (here: another class count under the same config) names the file and the cause."
    cfg = copy_run(finished, tmp_path / "run")
    path = Path(cfg.out_dir) / "checkpoint.pth"
    ck = load_checkpoint(path)
    ck["model"] = {k: (v[:-1] if k == "prototypes" or (k.startswith("encoder_q.classifier") and v.ndim > 0) else v)
                   for k, v in ck["model"].items()}
    torch.save(ck, path)
    with pytest.raises(RuntimeError) as e:
        train(replace(cfg, epochs=2))
    assert str(path) in str(e.value) and "another architecture or number of classes" in str(e.value)


# ---------------------------------------------------------------- 5. a frozen DDP rank

def _ranks(torchrun_pid):
    import psutil
    return {int(p.environ().get("RANK", -1)): p for p in psutil.Process(torchrun_pid).children(recursive=True)
            if "RANK" in p.environ()}


@pytest.mark.slow
def test_frozen_ddp_rank_fails_in_bounded_time(tmp_path, env, tiny_lmdb, tiny_bench, tiny_config):
    "SIGSTOP rank 1 after the first epoch: with timeout=10 the job fails, saying why, long before torch's 30 minutes."
    out = tmp_path / "ddp"
    cmd = torchrun_command(tiny_config(tiny_lmdb, tiny_bench, out, 50, timeout=10), 2)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint.pth").exists():
            assert proc.poll() is None and time.time() < deadline, "no first epoch"
            time.sleep(0.1)
        ranks = _ranks(proc.pid)
        ranks[1].suspend()                                            # SIGSTOP
        t0 = time.time()
        output, _ = proc.communicate(timeout=180)
        waited = time.time() - t0
    finally:
        for p in _ranks(proc.pid).values() if proc.poll() is None else []: p.kill()
        if proc.poll() is None: proc.kill()
    print(f"frozen rank: the job failed {waited:.0f} s after the SIGSTOP (timeout=10)")
    assert proc.returncode != 0
    assert "waited more than timeout=10" in output and "froze or died" in output, output[-3000:]
    assert waited < 120


# ---------------------------------------------------------------- fine-tuning: resume, lock, init (1, 2, 7, 8)

from lupnl import finetune as ft
from lupnl.checkpoints import export_backbone
from lupnl.models import resnet_trunk

from conftest import FT_TINY   # ft_finished's settings


@pytest.mark.parametrize("change", [dict(lr=2e-3), dict(K=2), dict(smoothing=0.0)])
def test_finetune_resume_refuses_changed_config(ft_finished, tmp_path, change):
    "Before, fine-tuning compared only 7 fields (_MUST_MATCH): lr, K, smoothing... changed silently on resume."
    cfg = copy_run(ft_finished, tmp_path / "run")
    with pytest.raises(ValueError) as e:
        ft.train(replace(cfg, epochs=2, **change))
    name, value = next(iter(change.items()))
    assert f"{name}: {getattr(ft_finished, name)!r} in the checkpoint, {value!r} now" in str(e.value)
    assert "--resume never" in str(e.value)


def test_finetune_resume_refuses_other_benchmark_items(ft_finished, tmp_path):
    "The same benchmark folder with a training image removed: refused by the items fingerprint."
    import shutil
    bench = ft.load_benchmark(ft_finished)
    root = Path(bench.train[0].path).parents[1]
    copy = tmp_path / "bench"
    shutil.copytree(root, copy)
    first = sorted((copy / "bounding_box_train").glob("*.jpg"))[0]
    first.unlink()
    cfg = copy_run(ft_finished, tmp_path / "run")
    with pytest.raises(ValueError, match="data: {'images': "):
        ft.train(replace(cfg, data=str(copy), epochs=2))


def test_finetune_second_run_stops(ft_finished, tmp_path):
    cfg = copy_run(ft_finished, tmp_path / "run")
    lock = runs.open_out_dir(cfg.out_dir)
    try:
        with pytest.raises(RuntimeError, match=f"is in use by another run \\(pid {os.getpid()}"):
            ft.train(replace(cfg, epochs=2))
    finally: lock.close()


@pytest.mark.parametrize("head", ["bot", "mgn"])
def test_finetune_init_from_its_own_checkpoint(ft_finished, tmp_path, head):
    "A fine-tuning checkpoint (BoT: backbone.*; MGN: stem + global branch) initialises a new fine-tuning run's trunk."
    if head == "bot":                                                   # the shared finished BoT run: read only
        src = Path(ft_finished.out_dir)
        assert ft_finished == ft.FinetuneConfig(**FT_TINY, out_dir=str(src))
        conv1 = torch.load(src / "checkpoint.pth", weights_only=True)["model"]["backbone.conv1.weight"]
    else:
        src = tmp_path / "src"
        model, _ = ft.train(ft.FinetuneConfig(**FT_TINY, model=head, out_dir=str(src)))
        conv1 = model.stem[0].weight.cpu()
    for new_head in ("bot", "mgn"):
        m, report = ft.build_model(ft.FinetuneConfig(model=new_head, init=str(src / "checkpoint.pth")), 5)
        assert report.missing == [] and report.unexpected == [] and report.mismatched == []
        assert report.source == str(src / "checkpoint.pth")
        assert torch.equal((m.backbone.conv1 if new_head == "bot" else m.stem[0]).weight, conv1)
        fresh, _ = ft.build_model(ft.FinetuneConfig(model=new_head), 5)  # without init: other weights, so the check can fail
        assert not torch.equal((fresh.backbone.conv1 if new_head == "bot" else fresh.stem[0]).weight, conv1)
    if head == "mgn":
        assert torch.equal(m.branches[0][1][1].conv2.weight, model.branches[0][1][1].conv2.weight)


def test_finetune_init_from_pretraining_checkpoint_and_backbone(finished, tmp_path):
    out = Path(finished.out_dir)
    for name in ("checkpoint.pth", "backbone.pth", "backbone.safetensors"):
        _, report = ft.build_model(ft.FinetuneConfig(init=str(out / name)), 5)
        assert report.missing == [] and report.mismatched == [], (name, report)


def test_finetune_init_bad_files(tmp_path, shared_data):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"empty.pth is empty \(0 bytes\)"):
        ft.build_model(ft.FinetuneConfig(init=str(tmp_path / "empty.pth")), 3)
    onnx = shared_data / "weights" / "osnet_x0_25_msmt17.onnx"
    (tmp_path / "model.pth").write_bytes(onnx.read_bytes()[:4096])      # an ONNX model under a .pth name
    for path in (onnx, tmp_path / "model.pth"):
        with pytest.raises(ValueError, match="is an ONNX model, not a lupnl checkpoint: evaluate it with `lupnl.checkpoints.OnnxModel`"):
            ft.build_model(ft.FinetuneConfig(init=str(path)), 3)
    torch.save(export_backbone(resnet_trunk("resnet50")), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=f"{tmp_path / 'r50.pth'}: checkpoint does not fit the resnet18 trunk"):
        ft.build_model(ft.FinetuneConfig(init=str(tmp_path / "r50.pth")), 3)


def test_finetune_negative_lr_on_the_command_line():
    res = subprocess.run([sys.executable, "-m", "lupnl.finetune", "--lr", "-1e-3"], capture_output=True, text=True)
    assert res.returncode != 0 and "FinetuneConfig.lr must be > 0, not -0.001" in res.stderr, res.stderr[-1500:]


# ---------------------------------------------------------------- 6. skipped corrupt images are logged

def test_skipped_corrupt_images_counted_across_workers(tiny_lmdb, tiny_bench, tmp_path, capsys, tiny_config):
    "8 corrupt crops of 128, read by 2 DataLoader workers: every epoch's row counts 8, the summary 16."
    ds = LMDBDataset(tiny_lmdb)
    bad = set(range(0, 128, 16))
    corrupt = tmp_path / "corrupt_lmdb"
    write_lmdb(corrupt, ((b"not an image" if i in bad else ds.read_bytes(i), int(ds.labels[i])) for i in range(len(ds))),
               progress=False, extra={"true_pids": list(ds.meta["true_pids"])})
    cfg = tiny_config(corrupt, tiny_bench, tmp_path / "run", 2, workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = train(cfg)
    assert [r["skipped_images"] for r in rows] == [8, 8]
    assert "corrupt images skipped: 16" in capsys.readouterr().out
