"""`python -m lupnl.evaluate` end to end, in subprocesses: a fast `--help`, a fine-tuned checkpoint scored at its own crop
size (the mAP its run logged), an ONNX model on real data, and the errors a user sees."""
import json, os, subprocess, sys, time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MPLBACKEND": "Agg",
       "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lupnl.evaluate", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_help_is_fast_and_imports_no_torch():
    t0 = time.time()
    res = cli("--help")
    took = time.time() - t0
    assert res.returncode == 0, res.stderr
    for text in ("checkpoint", "--data", "--size", "--json", "--flip", "read_benchmark", "example:"):
        assert text in res.stdout, text
    print(f"--help: {took:.1f} s")                                  # measured, not asserted: the probe below is the check
    probe = ("import runpy, sys\nsys.argv = ['lupnl.evaluate', '--help']\n"
             "try: runpy.run_module('lupnl.evaluate', run_name='__main__')\nexcept SystemExit: pass\n"
             "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=ENV, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("TORCH False"), out.stdout[-300:]


@pytest.mark.parametrize("job, flag", [("finetune", "--margin"), ("pretrain", "--queue_size")])
def test_job_help_imports_no_torch(job, flag):
    "`python -m lupnl.<job> --help` (its parser made by `lupnl.runs.job_cli`) prints the flags and exits before torch is imported."
    probe = (f"import runpy, sys\nsys.argv = ['lupnl.{job}', '--help']\n"
             f"try: runpy.run_module('lupnl.{job}', run_name='__main__')\nexcept SystemExit as e: print('EXIT', e.code)\n"
             "print('TORCH', 'torch' in sys.modules)")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=ENV, capture_output=True, text=True, check=True)
    took = time.time() - t0
    assert f"usage: python -m lupnl.{job}" in out.stdout and flag in out.stdout, out.stdout[-500:]
    assert out.stdout.strip().endswith("EXIT 0\nTORCH False"), out.stdout[-300:]
    print(f"{job} --help: {took:.1f} s")                           # measured, not asserted


def test_bad_flags_and_files_give_one_line_errors(tmp_path):
    "A bad flag: usage and the error (argparse); a bad file: one line. Both exit 2 without a traceback (lupnl.runs.user_errors)."
    res = cli("x.pth", "--size", "256")
    assert res.returncode == 2 and "expected HxW" in res.stderr and "Traceback" not in res.stderr
    res = cli(tmp_path / "missing.pth")
    assert res.returncode == 2 and "missing.pth" in res.stderr and "Traceback" not in res.stderr, res.stderr
    (tmp_path / "empty.pth").write_bytes(b"")
    res = cli(tmp_path / "empty.pth")
    assert res.returncode == 2 and "empty (0 bytes)" in res.stderr and "Traceback" not in res.stderr, res.stderr
    (tmp_path / "notes.pth").write_text("hello")
    res = cli(tmp_path / "notes.pth")
    assert res.returncode == 2 and "cannot read checkpoint" in res.stderr and "notes.pth" in res.stderr, res.stderr
    res = cli(tmp_path / "notes.pth", "--debug")                          # the traceback, for a bug report
    assert res.returncode == 1 and "Traceback" in res.stderr and "cannot read checkpoint" in res.stderr, res.stderr[-2000:]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    "A BoT ResNet-18 fine-tuned for 2 epochs at 64x32 on the built-in benchmark: (out_dir, last logged row)."
    from lupnl.finetune import FinetuneConfig, train
    out = tmp_path_factory.mktemp("finetune") / "run"
    _, rows = train(FinetuneConfig(out_dir=str(out), img_size=(64, 32), epochs=2, eval_every=0, resume="never"))
    assert "mAP" in rows[-1]
    return out, rows[-1]


def test_finetuned_checkpoint_reproduces_its_logged_map(finetuned):
    out, last = finetuned
    res = cli(out / "checkpoint.pth", "--json", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout)
    assert r["kind"] == "finetune" and r["img_size"] == [64, 32] and r["num_query"] == 100
    for k in ("mAP", "rank1", "rank5", "mINP"):
        assert abs(r[k] - last[k]) <= 0.1, (k, r[k], last[k])
    # the table: the same numbers, as printed for a person
    table = cli(out / "checkpoint.pth", "--device", "cpu")
    assert table.returncode == 0 and "64x32 crops" in table.stdout
    header, values = table.stdout.strip().splitlines()[-2:]
    assert header.split() == ["mAP", "mINP", "rank-1", "rank-5", "rank-10"]
    assert abs(float(values.split()[0]) - last["mAP"]) <= 0.01


@pytest.mark.slow
def test_crop_size_matters_and_size_overrides(finetuned):
    "The 256x128 default would score this 64x32 model differently; `--size` still wins over the checkpoint's size."
    from lupnl import load_model
    from lupnl.evaluate import evaluate
    out, last = finetuned
    model = load_model(out / "checkpoint.pth")
    assert model.img_size == (64, 32) and not model.training
    assert abs(evaluate(model, model.config["data"] or _toy_bench(), progress=False)["mAP"] - last["mAP"]) <= 0.1
    r = json.loads(cli(out / "checkpoint.pth", "--json", "--size", "256x128", "--device", "cpu").stdout)
    assert r["img_size"] == [256, 128] and abs(r["mAP"] - last["mAP"]) > 0.1


def _toy_bench():
    from lupnl.toy import toy_dataset
    return toy_dataset(progress=False).bench


def test_backbone_of_a_pretraining_run(tmp_path):
    "`backbone.pth` beside its run's `checkpoint.pth` is evaluated at the run's crop size, as the run's own evaluation is."
    import torch
    from dataclasses import asdict
    from lupnl.checkpoints import export_backbone
    from lupnl.pretrain import PretrainConfig, build_model
    from lupnl.checkpoints import save_checkpoint
    from lupnl.evaluate import evaluate
    torch.manual_seed(0)
    cfg = PretrainConfig(img_size=(48, 24))
    pnl = build_model(cfg, num_classes=5)
    save_checkpoint(dict(epoch=1, model=pnl.state_dict(), optimizer={}, scaler={}, labels=torch.zeros(3, dtype=torch.long),
                         config=asdict(cfg)), tmp_path / "checkpoint.pth")
    save_checkpoint(export_backbone(pnl), tmp_path / "backbone.pth")
    r = json.loads(cli(tmp_path / "backbone.pth", "--json", "--device", "cpu").stdout)
    expected = evaluate(pnl.backbone, _toy_bench(), size=(48, 24), progress=False)
    assert r["kind"] == "weights" and r["img_size"] == [48, 24]
    assert abs(r["mAP"] - expected["mAP"]) < 1e-6 and r["rank1"] == expected["rank1"]


def test_onnx_model_on_real_market(shared_data):
    "OSNet-x0.25 (ONNX) on the Market-1501 mini set: the numbers of the data's README and of 05_evaluate."
    res = cli(shared_data / "weights" / "osnet_x0_25_msmt17.onnx", "--data", shared_data / "market1501-pepper-mini", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout)
    assert r["kind"] == "onnx" and r["img_size"] == [256, 128] and r["num_valid"] == 30
    assert abs(r["mAP"] - 75.93) <= 0.05 and abs(r["rank1"] - 70.0) <= 0.5


# ---- issue 22: the jobs' command lines share lupnl.runs' parser (JobParser) and error handling (job_main, user_errors)

def job(name, *args, cwd=REPO):
    "`python -m lupnl.<name> args...` in `cwd`."
    return subprocess.run([sys.executable, "-m", f"lupnl.{name}", *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("name, typo, meant", [("pretrain", "--epohcs", "--epochs"), ("finetune", "--epohcs", "--epochs"),
                                               ("evaluate", "--szie", "--size")])
def test_misspelt_flag_names_the_nearest(name, typo, meant):
    "A misspelt flag exits 2 naming the nearest valid one, in two lines (a one-line usage, not the 40 flags of --help)."
    res = job(name, *(["x.pth"] if name == "evaluate" else []), typo, "3")
    assert res.returncode == 2 and f"unrecognized arguments: {typo} 3 (did you mean {meant}?)" in res.stderr, res.stderr
    assert len(res.stderr.splitlines()) == 2, res.stderr


def test_user_errors_are_one_line_and_leave_no_out_dir(tmp_path):
    "A user error: one line (at most 3 with argparse's usage), exit 2, no traceback, and no out_dir left by the failed run."
    res = job("pretrain", "--img_size", "128", "--out_dir", tmp_path / "D", cwd=tmp_path)      # the done-when
    assert res.returncode == 2 and len(res.stderr.splitlines()) <= 3, res.stderr
    assert "--img_size/--img-size: expected HxW such as 256x128, got '128'" in res.stderr and not (tmp_path / "D").exists()
    # after the out_dir was made (and locked): the folders the run created go again
    res = job("pretrain", "--data", tmp_path / "nowhere", "--out_dir", tmp_path / "runs" / "D", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"python -m lupnl.pretrain: error: LMDB folder not found: {tmp_path / 'nowhere'}"], res.stderr
    assert not (tmp_path / "runs").exists()
    (tmp_path / "a_file").write_text("")
    res = job("finetune", "--out_dir", tmp_path / "a_file", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"python -m lupnl.finetune: error: cannot create or write out_dir {tmp_path / 'a_file'}: file exists "
        "(a file is in the way: out_dir must be a folder's path)"], res.stderr
    (tmp_path / "mine").mkdir()                                          # a folder the user made: kept
    res = job("finetune", "--data", tmp_path / "nowhere", "--out_dir", tmp_path / "mine", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and "nowhere" in res.stderr, res.stderr
    assert (tmp_path / "mine").is_dir()
    res = job("finetune", "--data", tmp_path / "nowhere", "--out_dir", tmp_path / "F", "--debug", cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" in res.stderr and "nowhere" in res.stderr and not (tmp_path / "F").exists()


def test_img_size_reads_and_shows_hxw_and_flip_is_a_switch():
    "`--img_size` shows its default as HxW and reads HxW or H,W; finetune's `--flip` is a switch, as evaluate's, and still takes true/false."
    import lupnl.finetune as ft, lupnl.pretrain as pre
    for mod, default in ((pre, "32x16"), (ft, "64x32")):
        text = " ".join(mod.config_parser().format_help().split())
        assert f"--img_size HxW, --img-size HxW (height, width) of the crops, e.g. 256x128 (default: {default};" in text, text
        assert [mod.parse_config(["--img_size", s]).img_size for s in ("256x128", "256,128")] == [(256, 128)] * 2
    assert [ft.parse_config(a).flip for a in ([], ["--flip"], ["--flip", "true"], ["--flip", "false"])] == [False, True, True, False]
    assert ft.parse_config(["--flip", "--epochs", "2"]).epochs == 2      # a switch does not swallow the next flag


def test_load_model_is_in_dir_lupnl():
    "`lupnl.load_model` (imported on first use) is listed by dir(lupnl), so tab completion finds it; importing lupnl loads no torch."
    probe = "import sys, lupnl; print('load_model' in dir(lupnl), '__version__' in dir(lupnl), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=ENV, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "False"], out.stdout + out.stderr
