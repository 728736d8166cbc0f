"""Bad input and bad luck for the two jobs (issue 12): resume of another run, two runs in one out_dir, full disks,
temporary files of killed runs, a frozen DDP rank, skipped corrupt images, late or anonymous errors, and every
lupnl checkpoint as fine-tuning `init`; and (issue 23) results that were silently wrong or came late: weights that are
not weights, a non-finite loss, a final evaluation before the last checkpoint, unreadable benchmark images, a crop size
borrowed from another trunk, pre-training on one identity. Each test names the message a user sees."""
import errno, json, math, os, re, signal, subprocess, sys, time, warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lupnl.runs as runs
import lupnl.checkpoints as checkpoints
from lupnl.data import DataError, LMDBDataset, write_lmdb
from lupnl import evaluate as ev
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
    with pytest.warns(UserWarning, match=r"metrics.jsonl, line 2: torn last line"):   # the checkpoint comes first: no row 1
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
    "SIGSTOP rank 1 after the first epoch: the job fails through its own timeout=10, saying why, not through torch's 30 minutes."
    out = tmp_path / "ddp"
    cmd = torchrun_command(tiny_config(tiny_lmdb, tiny_bench, out, 50, timeout=10), 2)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not (out / "checkpoint.pth").exists():                  # a finite run: it writes one or ends
            assert proc.poll() is None, "the job ended before its first epoch"
            time.sleep(0.1)
        ranks = _ranks(proc.pid)
        ranks[1].suspend()                                            # SIGSTOP
        t0 = time.time()
        output, _ = proc.communicate()                                # without lupnl's timeout, torch's own 30 min would end it
        waited = time.time() - t0
    finally:
        for p in _ranks(proc.pid).values() if proc.poll() is None else []: p.kill()
        if proc.poll() is None: proc.kill()
    print(f"frozen rank: the job failed {waited:.0f} s after the SIGSTOP (timeout=10)")     # measured, not asserted
    assert proc.returncode != 0
    assert "waited more than timeout=10" in output and "froze or died" in output, output[-3000:]   # lupnl's timeout fired


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


# ---------------------------------------------------------------- issue 23: no silent wrong results

from lupnl.checkpoints import load_model, load_pretrained, export_safetensors

SPOILED = {"int64": "holds torch.int64 values, not floating point", "nan": r"non-finite values \(NaN or inf\)",
           "zero": "every weight tensor is constant"}


def spoil(src, dest, how):
    "A copy of the `.safetensors` backbone `src` at `dest` with its tensors cast to int64, filled with NaN, or all zero."
    from safetensors.torch import load_file, save_file
    f = {"int64": lambda v: v.long(), "zero": torch.zeros_like,
         "nan": lambda v: torch.full_like(v, float("nan")) if v.is_floating_point() else v}[how]
    save_file({k: f(v).contiguous() for k, v in load_file(str(src)).items()}, str(dest))
    return dest


@pytest.mark.parametrize("how", list(SPOILED))
def test_weights_that_are_not_weights_are_refused(finished, ft_finished, tmp_path, how):
    """A backbone cast to int64 (before: loaded as an all-zero model, mAP of constant features), NaN-filled (before: loaded,
    fine-tuned with loss null, failed at the end) or all zero: refused by load_model, load_pretrained and init, naming the
    file and the first bad tensor; a fine-tuning checkpoint too."""
    bad = spoil(Path(finished.out_dir) / "backbone.safetensors", tmp_path / f"{how}.safetensors", how)
    for load in (lambda: load_model(bad), lambda: load_pretrained(resnet_trunk("resnet18"), bad),
                 lambda: ft.build_model(ft.FinetuneConfig(init=str(bad)), 5)):
        with pytest.raises(ValueError, match=SPOILED[how]) as e: load()
        assert str(bad) in str(e.value) and re.search(r"'[\w.]+\.(weight|bias|running_mean|running_var)'", str(e.value)) \
            and "nothing was loaded" in str(e.value), str(e.value)                  # the file and a tensor named
    ck = load_checkpoint(Path(ft_finished.out_dir) / "checkpoint.pth")
    ck["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ck["model"].items()}
    torch.save(ck, tmp_path / "ft_nan.pth")
    with pytest.raises(ValueError, match=rf"load_model\({tmp_path / 'ft_nan.pth'}\): tensor 'backbone.conv1.weight' holds"):
        load_model(tmp_path / "ft_nan.pth")


@pytest.mark.parametrize("how", ["int64", "nan"])
def test_evaluate_command_refuses_them_in_one_line(finished, tiny_bench, tmp_path, how, env):
    bad = spoil(Path(finished.out_dir) / "backbone.safetensors", tmp_path / "backbone.safetensors", how)
    res = subprocess.run([sys.executable, "-m", "lupnl.evaluate", str(bad), "--data", str(tiny_bench), "--device", "cpu"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    err = res.stderr.strip()
    assert res.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, res.stderr[-3000:]
    assert err.startswith(f"python -m lupnl.evaluate: error: load_model({bad}): tensor '") and re.search(SPOILED[how], err), err


def test_finetune_init_refuses_them_before_training(finished, tmp_path, env):
    "`--init` with a NaN (command line) or int64 (train) backbone: refused, naming the file, before the first epoch."
    src = Path(finished.out_dir) / "backbone.safetensors"
    nan, i64 = spoil(src, tmp_path / "nan.safetensors", "nan"), spoil(src, tmp_path / "int64.safetensors", "int64")
    cfg = ft.FinetuneConfig(**FT_TINY, init=str(nan), out_dir=str(tmp_path / "cli"))
    res = subprocess.run([sys.executable, "-m", "lupnl.finetune", *config_args(cfg)], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode != 0 and f"{nan}: tensor '" in res.stderr and "non-finite values" in res.stderr, res.stderr[-3000:]
    with pytest.raises(ValueError, match=f"{i64}: tensor '.*int64"):
        ft.train(replace(cfg, init=str(i64), out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "cli").exists()                  # the command line removes the out_dir its failed run made
    assert not {"metrics.jsonl", "checkpoint.pth"} & {p.name for p in (tmp_path / "run").iterdir()}
    assert "epoch=" not in (tmp_path / "run" / "log.txt").read_text()


def test_finetune_stops_at_the_first_non_finite_loss(ft_finished, tmp_path, monkeypatch):
    """A NaN loss at the second step of epoch 2: one line naming the epoch, step, lr and cause; the checkpoint stays epoch 1's
    (before: every epoch trained with loss null and was saved). The run then resumes from there."""
    from lupnl.runs import NonFiniteLossError
    cfg = replace(copy_run(ft_finished, tmp_path / "run"), epochs=2, lr_steps=())   # its steps, given: one more epoch
    real, calls = ft.reid_losses, []
    def nan_once(out, labels, c):
        loss, ce, tri = real(out, labels, c)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), ce, tri
    monkeypatch.setattr(ft, "reid_losses", nan_once)
    with pytest.raises(NonFiniteLossError) as e: ft.train(cfg)
    msg, out = str(e.value), Path(cfg.out_dir)
    assert isinstance(e.value, RuntimeError) and "\n" not in msg
    assert re.search(r"^fine-tuning: the loss is not finite \(NaN or inf\) at epoch 2, step 2 of \d+ \(lr 0\.001\): "
                     r"the learning rate is likely too high, or the weights or inputs are not finite", msg), msg
    ck = load_checkpoint(out / "checkpoint.pth")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in read_metrics(out)] == [0]
    monkeypatch.undo()
    _, rows = ft.train(cfg)
    assert [r["epoch"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows)


def test_finetune_with_an_absurd_lr_stops_and_saves_nothing(tmp_path):
    from lupnl.runs import NonFiniteLossError
    cfg = ft.FinetuneConfig(**{**FT_TINY, "epochs": 2}, optimizer="sgd", lr=1e4, warmup_epochs=0, out_dir=str(tmp_path / "run"))
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, step \d+ of \d+ \(lr 1e\+04\): the learning rate is likely too high"):
        ft.train(cfg)
    assert not {"metrics.jsonl", "checkpoint.pth"} & {p.name for p in (tmp_path / "run").iterdir()}


def test_pretrain_stops_at_the_first_non_finite_loss(finished, tmp_path, monkeypatch):
    from lupnl.runs import NonFiniteLossError
    from lupnl.pnl import PNL
    cfg = replace(copy_run(finished, tmp_path / "run"), epochs=2)
    real, calls = PNL.forward, []
    def nan_once(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        return dict(out, loss=out["loss"] * float("nan")) if len(calls) == 3 else out
    monkeypatch.setattr(PNL, "forward", nan_once)
    with pytest.raises(NonFiniteLossError, match=r"^pre-training: the loss is not finite \(NaN or inf\) at epoch 2, step 3 of 8 \(lr "):
        train(cfg)
    out = Path(cfg.out_dir)
    ck = load_checkpoint(out / "checkpoint.pth")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in read_metrics(out)] == [0]


def test_finetune_checkpoint_comes_before_the_final_evaluation(ft_finished, tmp_path, monkeypatch):
    """The final evaluation fails (before: after the last epoch, whose checkpoint was not yet written): the epoch is kept;
    the run restarted evaluates and logs it without training it again."""
    cfg = replace(copy_run(ft_finished, tmp_path / "run"), epochs=2, lr_steps=())   # its steps, given: one more epoch
    def broken(*a, **k): raise RuntimeError("the evaluation failed")
    monkeypatch.setattr(ft, "evaluate", broken)
    with pytest.raises(RuntimeError, match="the evaluation failed"): ft.train(cfg)
    out = Path(cfg.out_dir)
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 2 and [r["epoch"] for r in read_metrics(out)] == [0]
    monkeypatch.undo()
    _, rows = ft.train(cfg)
    assert [r["epoch"] for r in rows] == [0, 1] and "mAP" in rows[1] and "loss" in rows[1]
    assert (out / "log.txt").read_text().count("epoch=1 ") == 1          # trained once, logged once


def test_pretrain_checkpoint_comes_before_the_final_evaluation(finished, tmp_path, monkeypatch):
    import lupnl.pretrain as pre
    cfg = replace(copy_run(finished, tmp_path / "run"), epochs=2)
    def broken(*a, **k): raise RuntimeError("the evaluation failed")
    monkeypatch.setattr(pre, "evaluate", broken)
    with pytest.raises(RuntimeError, match="the evaluation failed"): train(cfg)
    out = Path(cfg.out_dir)
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 2 and [r["epoch"] for r in read_metrics(out)] == [0]
    monkeypatch.undo()
    rows = train(cfg)
    assert [r["epoch"] for r in rows] == [0, 1] and "mAP" in rows[1] and "purity" in rows[1]


def _bench_copy(tmp_path):
    "A copy of the built-in benchmark (the one `ft_finished` trains on) in `tmp_path / 'bench'`."
    import shutil
    root = Path(ft.load_benchmark(ft.FinetuneConfig()).train[0].path).parents[1]
    return Path(shutil.copytree(root, tmp_path / "bench"))


def test_finetune_skips_and_counts_bad_benchmark_images(tmp_path, env):
    """`python -m lupnl.finetune --data BENCH --epochs 2` where a gallery image is garbage, a query image 20000x20000 and a
    training image zero bytes: exit 0, 2 rows, every skip counted (before: CorruptImageError mid-epoch, or after the last)."""
    from test_bad_input_data import png_header
    bench = _bench_copy(tmp_path)
    cfg = ft.FinetuneConfig(**{**FT_TINY, "epochs": 2}, data=str(bench), out_dir=str(tmp_path / "run"))
    b = ft.load_benchmark(cfg)
    train_dl, _, _ = ft.build_loaders(cfg, b)
    draws = []                                             # the training items the two epochs will request
    for epoch in (0, 1):
        train_dl.sampler.set_epoch(epoch)
        draws += list(train_dl.sampler)
    Path(train_dl.dataset.items[draws[0]].path).write_bytes(b"")
    Path(b.gallery[5].path).write_bytes(b"garbage")
    Path(b.query[3].path).write_bytes(png_header(20000, 20000))
    res = subprocess.run([sys.executable, "-m", "lupnl.finetune", *config_args(cfg)], env=env, capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(cfg.out_dir)
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["skipped_eval_images"] == 2 and "mAP" in rows[1]
    assert sum(r["skipped_images"] for r in rows) == draws.count(draws[0]) >= 1
    assert f"corrupt images skipped: {draws.count(draws[0])}" in res.stdout
    # the evaluation command: the same bench, the skipped images in its JSON
    r = ev.main([str(Path(cfg.out_dir) / "checkpoint.pth"), "--data", str(bench), "--json", "--device", "cpu"])
    assert r["skipped_eval_images"] == 2 and r["num_valid"] == rows[1]["num_valid"]


def test_a_benchmark_split_that_cannot_be_read_is_refused_before_training(tmp_path, tiny_lmdb, tiny_config):
    bench = _bench_copy(tmp_path)
    gallery = ft.load_benchmark(ft.FinetuneConfig(data=str(bench))).gallery
    for it in gallery: Path(it.path).write_bytes(b"garbage")
    msg = f"{bench / 'bounding_box_test'}: none of its {len(gallery)} images can be read"
    with pytest.raises(DataError, match=re.escape(msg)):
        ft.train(ft.FinetuneConfig(**FT_TINY, data=str(bench), out_dir=str(tmp_path / "ft")))
    with pytest.raises(DataError, match=re.escape(msg)):
        train(tiny_config(tiny_lmdb, bench, tmp_path / "pre", 1))
    for out in ("ft", "pre"): assert not (tmp_path / out / "checkpoint.pth").exists() and not (tmp_path / out / "metrics.jsonl").exists()


def test_a_backbone_does_not_borrow_a_strangers_crop_size(finished, tmp_path):
    "A ResNet-50 backbone beside a ResNet-18 run's checkpoint (32x16): before, evaluated at 32x16 without a word."
    import shutil
    shutil.copy(Path(finished.out_dir) / "checkpoint.pth", tmp_path)
    shutil.copy(Path(finished.out_dir) / "backbone.safetensors", tmp_path)
    export_safetensors(resnet_trunk("resnet50"), tmp_path / "r50.safetensors")
    with pytest.warns(UserWarning, match="crop size") as w:
        m = load_model(tmp_path / "r50.safetensors")
    msg = " ".join(str(i.message) for i in w)
    assert m.img_size == (256, 128)
    assert (f"the run checkpoint beside it, {tmp_path / 'checkpoint.pth'}, describes another trunk: 'resnet18', not this "
            f"file's 'resnet50'" in msg and "its crop size 32x16 is not borrowed" in msg and "unknown" in msg), msg
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert load_model(tmp_path / "backbone.safetensors").img_size == (32, 16)      # its own run's: borrowed
    assert not [i for i in w if "crop size" in str(i.message)]


def test_pretraining_on_one_identity_is_refused(tiny_lmdb, tiny_bench, tmp_path, tiny_config):
    "Before: trained to loss_cls=0 acc_cls=100 without a word. MoCo, which reads no labels, still takes such data."
    from lupnl.pretrain import build_data
    ds = LMDBDataset(tiny_lmdb)
    one = write_lmdb(tmp_path / "one_id", ((ds.read_bytes(i), 7) for i in range(32)), progress=False)
    with pytest.raises(ValueError, match=r"1 identity in its labels \('pids'\): preset 'pnl' .* needs at least 2") as e:
        train(tiny_config(one, tiny_bench, tmp_path / "run", 1))
    assert str(one) in str(e.value) and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert len(build_data(tiny_config(one, tiny_bench, tmp_path / "moco", 1, preset="moco"))[0]) == 32


def test_diverging_run_is_one_line_on_the_command_line(tmp_path):
    "A loss that turns NaN stops `python -m lupnl.finetune` with one line naming the step and lr, exit status 2."
    args = [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in FT_TINY.items()]
    res = subprocess.run([sys.executable, "-m", "lupnl.finetune", *args, "--optimizer", "sgd", "--lr", "1e4",
                          "--out_dir", str(tmp_path / "run")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = [l for l in res.stderr.splitlines() if "error" in l]
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(err) == 1, res.stderr[-2000:]
    assert "the loss is not finite" in err[0] and "(lr " in err[0] and "at epoch 1, step " in err[0]
