"""End-to-end tests of lupnl.pretrain: the papermill run with defaults, kill-and-resume, 2-process DDP on CPU (gloo)."""
import json, math, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import conftest   # tests/conftest.py: HELP_WITHOUT_TORCH
import pytest
import torch
import torchvision

from lupnl.pretrain import PretrainConfig, torchrun_command, train
from lupnl.runs import config_args, read_metrics
from lupnl.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
# The fixtures data_home, env, tiny_lmdb, tiny_bench and tiny_config live in conftest.py (shared with test_bad_input.py).
EXPECTED_KEYS = {"epoch", "lr", "loss", "loss_cls", "loss_proto", "loss_inst", "acc_inst", "acc_cls", "epoch_time",
                 "n_corrected", "purity_before", "purity", "bcubed_f_before", "n_fixed",
                 # issue 11, section 2: the collapse / correction monitors, and their scores against the truth
                 "emb_mean_norm", "emb_eff_rank", "proto_top1", "cls_conf_median", "proto_conf_median", "above_threshold",
                 "corrected_frac", "correction_precision", "correction_recall", "fixable_frac", "bcubed_f", "monitor_time"}


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
    from typing import Optional
    params = {"Optional": Optional}                            # the cell's type annotations use it
    exec("".join(cells[0]["source"]), params)
    for k in ("__builtins__", "__annotations__", "Optional"): params.pop(k, None)
    assert params.pop("run_ablation") is None                 # the notebook's switch, not a config field
    assert params == asdict(PretrainConfig())


@pytest.mark.slow
def test_papermill_defaults(tmp_path, env):
    "The README's main command: papermill with default parameters, built-in data generated from scratch (its time is printed, not asserted)."
    out, tmp = tmp_path / "run", tmp_path / "tmpdir"
    tmp.mkdir()
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "papermill", "nbs/03_pretrain.ipynb", str(tmp_path / "out.ipynb"),
                          "-p", "out_dir", str(out), "--log-level", "WARNING"], cwd=REPO, env={**env, "TMPDIR": str(tmp)},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    minutes = (time.time() - t0) / 60
    print(f"papermill with defaults (including generating the toy data): {minutes:.2f} min")
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
    # issue 22: every parameters line parsed; one figure in out_dir (no copy); TensorBoard events; nothing left in TMPDIR
    assert "Unable to parse" not in res.stdout + res.stderr, res.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["metrics.png"]
    assert list(out.glob("events.out.tfevents.*"))
    left = sorted(p.name for p in tmp.iterdir())   # torch's compile cache folder too goes elsewhere (lupnl/__init__.py)
    assert left == [], f"the run left files in TMPDIR: {left}"


@pytest.mark.slow
def test_kill_and_resume(tmp_path, env, tiny_lmdb, tiny_bench, tiny_config):
    "SIGKILL a run right after its first checkpoint; running it again resumes there and replays the uninterrupted run."
    epochs = 3
    cmd = [sys.executable, "-m", "lupnl.pretrain"]
    out = tmp_path / "killed"
    args = config_args(tiny_config(tiny_lmdb, tiny_bench, out, epochs))
    proc = subprocess.Popen(cmd + args, env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / "checkpoint.pth").exists():                  # a finite run: it writes one or ends
            assert proc.poll() is None, f"run ended (rc {proc.returncode}) before writing a checkpoint"
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
    kept = [r for r in before if r["epoch"] < resumed_at]              # the checkpoint comes first: the kill may have cut
    assert rows[:len(kept)] == kept and len(kept) >= resumed_at - 1     # off the last row, which the resumed run logs
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == epochs
    check_backbone(out / "backbone.pth")

    # every epoch reseeds from (seed, epoch, rank): the resumed run replays an uninterrupted one
    straight = tmp_path / "straight"
    subprocess.run(cmd + config_args(tiny_config(tiny_lmdb, tiny_bench, straight, epochs)), env=env, cwd=tmp_path, check=True,
                   capture_output=True)
    ref = read_metrics(straight)
    for a, b in zip(rows, ref):
        for k in ("loss", "loss_cls", "loss_inst", "loss_proto", "corrected_frac", "mAP"):
            if k in b: assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["epoch"], k, a[k], b[k])


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path, env, tiny_lmdb, tiny_bench, tiny_config):
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


def test_help_answers_before_torch_and_explains(env):
    "`python -m lupnl.pretrain --help` answers before torch is imported, with each field's doc, choices and reference value."
    res = subprocess.run([sys.executable, "-c", conftest.HELP_WITHOUT_TORCH, "lupnl.pretrain"], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.rstrip().endswith("torch imported: False"), res.stdout[-300:]
    text = " ".join(res.stdout.split())
    assert ("--lr LR peak learning rate (none: the preset's reference lr scaled linearly to batch_size: PNL 0.4 * B / 1536, "
            "MoCo v2 0.3 * B / 2560) (default: None; reference: 0.4 at batch 1536 (PNL), 0.3 at 2560 (MoCo v2))") in text
    assert "one of: pnl, ce, moco, no_proto, no_correction, no_label_guided" in text
    assert "--timeout TIMEOUT seconds a DDP process waits" in text


def test_papermill_unknown_parameter_fails(tmp_path, env):
    "`papermill ... -p epoch 2` (a typo) fails before any training and names the nearest parameter."
    res = subprocess.run([sys.executable, "-m", "papermill", "nbs/03_pretrain.ipynb", str(tmp_path / "out.ipynb"),
                          "-p", "out_dir", str(tmp_path / "run"), "-p", "epoch", "2"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "unknown parameter 'epoch' (did you mean 'epochs'?)" in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    assert not (tmp_path / "run").exists()


def test_notebook_switch_is_not_overwritten():
    "`-p run_ablation True` survives the notebook's later cells (None means: only under nbdev_test --flags slow)."
    nb = json.loads((REPO / "nbs" / "03_pretrain.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "ablation_cfg = replace" in "".join(c["source"]))
    code = "".join(l for l in "".join(cell["source"]).splitlines(True) if l.startswith("run_ablation = "))
    assert "run_slow(run_ablation)" in code
    from lupnl.runs import run_slow
    for given, env_in_test, expected in ((True, None, True), (False, "1", False), (None, "1", True), (None, None, False)):
        ns = dict(run_ablation=given, os=os, run_slow=run_slow)
        os.environ.pop("IN_TEST", None) if env_in_test is None else os.environ.__setitem__("IN_TEST", env_in_test)
        try: exec(code, ns)
        finally: os.environ.pop("IN_TEST", None)
        assert ns["run_ablation"] is expected, (given, env_in_test)


def test_tensorboard_events_beside_the_metrics(finished):
    """Issue 22: a 1-epoch run writes TensorBoard event files in its out_dir: each number of its metrics.jsonl row as a
    scalar at step epoch, and its figure (metrics.png, the only PNG there) as an image."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = Path(finished.out_dir)
    assert list(out.glob("events.out.tfevents.*")) and sorted(p.name for p in out.glob("*.png")) == ["metrics.png"]
    acc = EventAccumulator(str(out)); acc.Reload()
    [row] = read_metrics(out)
    numbers = {k for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"loss", "lr", "mAP", "purity", "epoch_time"} <= numbers and set(acc.Tags()["scalars"]) == numbers
    for k in numbers:
        [e] = acc.Scalars(k)
        assert e.step == 0 and e.value == pytest.approx(row[k], rel=1e-5, abs=1e-6), k
    assert [i.step for i in acc.Images("metrics")] == [0]


def test_backbone_safetensors(finished, tiny_lmdb, tiny_bench, tiny_config):
    "A run writes backbone.safetensors beside backbone.pth: the same tensors, torchvision names, readable by plain safetensors."
    from safetensors.torch import load_file
    from lupnl.checkpoints import load_pretrained
    from lupnl.models import resnet_trunk
    out = Path(finished.out_dir)                                         # the shared finished 1-epoch run: read only
    assert finished == tiny_config(tiny_lmdb, tiny_bench, out, 1)
    st = load_file(out / "backbone.safetensors")
    res = torchvision.models.resnet18().load_state_dict(st, strict=False)
    assert set(res.missing_keys) == {"fc.weight", "fc.bias"} and not res.unexpected_keys
    pth = torch.load(out / "backbone.pth", weights_only=True)
    assert st.keys() == pth.keys() and all(torch.equal(st[k], pth[k]) for k in st)
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert torch.equal(st["layer4.1.conv2.weight"], ckpt["model"]["encoder_q.trunk.layer4.1.conv2.weight"])  # the query trunk
    trunk = resnet_trunk("resnet18")
    report = load_pretrained(trunk, out / "backbone.safetensors", verbose=False)
    assert report.missing == [] and report.unexpected == [] and len(report.loaded) == len(st)
    assert torch.equal(trunk.conv1.weight, st["conv1.weight"])
    assert not list(out.glob("*.tmp*"))                                  # both written atomically, nothing left over


def test_vit_pretrains_and_fine_tunes(tmp_path, tiny_lmdb, tiny_bench, tiny_config):
    "ViT-S/16 (full depth, timm, random init) pre-trains on CPU at 32x16 crops (2x1 patches); load_model reads it back; BoT fine-tunes from its safetensors."
    import lupnl.finetune as ft
    from safetensors.torch import load_file
    out = tmp_path / "vit"
    t0 = time.time()
    rows = train(tiny_config(tiny_lmdb, tiny_bench, out, 1, arch="vit_small_patch16"))
    print(f"ViT-S pre-training, 1 epoch of 8 steps: {time.time() - t0:.1f} s")
    assert len(rows) == 1 and all(math.isfinite(rows[0][k]) for k in ("loss", "loss_cls", "loss_proto", "loss_inst"))
    assert 0 < rows[0]["mAP"] <= 100
    st = load_file(out / "backbone.safetensors")
    assert st["pos_embed"].shape == (1, 1 + 16 * 8, 384) and sum(k.endswith("attn.qkv.weight") for k in st) == 12
    from lupnl.checkpoints import load_model                 # the run, its .pth and its .safetensors: one ViT, same features
    x = torch.randn(2, 3, 32, 16)
    feats = [load_model(out / f)(x) for f in ("checkpoint.pth", "backbone.pth", "backbone.safetensors")]
    assert feats[0].shape == (2, 384) and all(torch.allclose(feats[0], f, atol=1e-5) for f in feats[1:])
    t0 = time.time()
    cfg = ft.FinetuneConfig(arch="vit_small_patch16", init=str(out / "backbone.safetensors"), epochs=1, id_ratio=0.3,
                            P=4, K=4, img_size=(64, 32), eval_every=0, out_dir=str(tmp_path / "ft"))
    model, ft_rows = ft.train(cfg)
    print(f"ViT-S BoT fine-tuning, 1 epoch: {time.time() - t0:.1f} s")
    assert "loaded 150 trunk tensors; missing 0" in (tmp_path / "ft" / "log.txt").read_text()
    assert len(ft_rows) == 1 and math.isfinite(ft_rows[0]["loss"]) and 0 < ft_rows[0]["mAP"] <= 100
    assert model.backbone.pos_embed.shape == st["pos_embed"].shape


def test_vit_command_line(tmp_path, env, tiny_lmdb, tiny_bench, tiny_config):
    "`python -m lupnl.pretrain --arch vit_small_patch16 --trunk_depth 1` runs and writes metrics; a ResNet refuses trunk_depth."
    out = tmp_path / "vit_cli"
    args = config_args(tiny_config(tiny_lmdb, tiny_bench, out, 1, arch="vit_small_patch16", trunk_depth=1))
    assert args[args.index("--arch") + 1] == "vit_small_patch16" and args[args.index("--trunk_depth") + 1] == "1"
    subprocess.run([sys.executable, "-m", "lupnl.pretrain", *args], env=env, cwd=tmp_path, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert [r["epoch"] for r in read_metrics(out)] == [0] and (out / "backbone.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "lupnl.pretrain", "--trunk_depth", "2", "--out_dir", str(tmp_path / "bad")],
                         env=env, cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "trunk_depth is for ViT trunks only" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_recipe_follows_batch_and_epochs(tmp_path, tiny_lmdb, tiny_bench, tiny_config):
    """lr, milestones and starts left None follow the preset's reference recipe, scaled to this run; the checkpoint stores
    the resolved values; resuming with more epochs is refused with a hint to give the derived fields explicitly."""
    from dataclasses import replace
    from lupnl.pretrain import resolve_config
    cfg = tiny_config(tiny_lmdb, tiny_bench, tmp_path / "run", 2, lr=None, lr_steps=None, correct_start=None,
                      label_guided_start=None, monitor_size=0)
    train(cfg)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["config"]
    assert saved["lr"] == pytest.approx(0.4 * 16 / 1536) and tuple(saved["lr_steps"]) == (1,)
    assert (saved["schedule"], saved["temperature"], saved["views"]) == ("step", 0.07, "weak,strong")
    with pytest.raises(ValueError, match=r"(?s)lr_steps: \(1,\) in the checkpoint, \(2, 4\) now.*follow epochs when left None.*--lr_steps 1"):
        train(replace(cfg, epochs=5))
    rows = train(replace(cfg, epochs=3, lr_steps=(1,), correct_start=1, label_guided_start=1,
                         proto_momentum=saved["proto_momentum"]))                  # explicit: accepted
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    moco = resolve_config(replace(cfg, preset="moco"))
    assert (moco.lr, moco.schedule, moco.temperature, moco.views) == (pytest.approx(0.3 * 16 / 2560), "cosine", 0.1, "strong,strong")


@pytest.mark.slow
def test_ddp_no_instance_preset(tmp_path, env, tiny_lmdb, tiny_bench, tiny_config):
    "Under DDP the prototype head has no loss in epoch 0 without the instance loss either: the run must not stop there."
    out = tmp_path / "ddp_no_instance"
    res = subprocess.run(torchrun_command(tiny_config(tiny_lmdb, tiny_bench, out, 2, preset="no_instance", queue_size=40), 2),
                         env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]


def test_metrics_rows_score_every_move(finished):
    "Each epoch's row splits the changed labels into fixes, neutral and broken ones, and gives the recall per noise kind."
    from lupnl.noise import WRONG_KINDS
    row = read_metrics(finished.out_dir)[-1]
    assert {"n_fixed", "n_neutral", "n_broken", "n_corrected"} <= set(row), sorted(row)
    assert {f"recall_{k}" for k in WRONG_KINDS} <= set(row) and "recall_junk" not in row, sorted(row)
    assert row["n_fixed"] + row["n_neutral"] + row["n_broken"] <= row["n_corrected"]
    if row["n_corrected"]: assert row["correction_precision"] == row["n_fixed"] / row["n_corrected"]


def test_faithful_recipe_scales_to_the_run(tmp_path, tiny_lmdb, tiny_bench, tiny_config):
    "`--preset pnl` with defaults: one head, the prototype momentum scaled to the run's updates per label, the blur to the crop."
    from lupnl.data import LMDBDataset
    from lupnl.pretrain import RECIPES, scaled_proto_momentum, blur_sigma, start_run
    cfg = tiny_config(tiny_lmdb, tiny_bench, tmp_path / "run", 6, proto_momentum=None)
    assert cfg.inst_head is False and PretrainConfig().proto_momentum is None
    run = start_run(cfg)
    ds = LMDBDataset(tiny_lmdb)
    assert run.cfg.proto_momentum == scaled_proto_momentum(RECIPES["pnl"], 6, len(ds) / ds.num_classes) < 0.999
    assert run.model.proto_m == run.cfg.proto_momentum and getattr(run.model.encoder_q, "proj_inst", None) is None
    assert run.dataset.transform.strong.sigma == blur_sigma(cfg.img_size)


def test_val_ids_hold_out_identities_for_model_selection(tmp_path, tiny_lmdb, tiny_bench, tiny_config):
    "`--val_ids N`: N true identities leave the training data and form a validation benchmark scored at every evaluation."
    from lupnl.data import LMDBDataset
    from lupnl.pretrain import held_out_split, build_data
    ds = LMDBDataset(tiny_lmdb)
    true = np.asarray(ds.meta["true_pids"])
    keep, (qi, qp, qc), (gi, gp, gc) = held_out_split(ds, 3)
    held = set(qp.tolist())
    assert len(held) == 3 and not held & set(true[keep].tolist()) and set(gp.tolist()) <= held
    assert sorted(np.concatenate([keep, qi, gi]).tolist()) == list(range(len(ds)))
    assert held_out_split(ds, 3)[0].tolist() == keep.tolist()                              # the same draw every run
    cfg = tiny_config(tiny_lmdb, tiny_bench, tmp_path / "run", 1, val_ids=3, monitor_size=0)
    _, sampler, loader, _ = build_data(cfg)
    assert len(sampler) == len(keep)
    rows = train(cfg)
    assert 0 <= rows[-1]["val_mAP"] <= 100 and "mAP" in rows[-1]
    with pytest.raises(ValueError, match="val_ids=500"): held_out_split(ds, 500)


def test_help_shows_val_ids_and_inst_head_off(env):
    res = subprocess.run([sys.executable, "-m", "lupnl.pretrain", "--help"], env=env, capture_output=True, text=True, check=True)
    text = " ".join(res.stdout.split())
    assert "--val-ids VAL_IDS hold out this many identities" in text
    inst = text.split("--inst-head [INST_HEAD]", 1)[1][:200]
    assert inst.startswith(" extension, not in the reference") and "(default: False;" in inst


def test_val_ids_on_tracker_data_where_each_identity_has_one_camera(tmp_path, tiny_lmdb):
    "MOT-built data: an identity is seen by one camera (its sequence); its held-out query gets a camera of its own."
    from lupnl.data import LMDBDataset, write_lmdb
    from lupnl.pretrain import held_out_split
    ds = LMDBDataset(tiny_lmdb)
    true = np.asarray(ds.meta["true_pids"])
    out = write_lmdb(tmp_path / "mot", ((ds.read_bytes(i), int(ds.labels[i])) for i in range(len(ds))), progress=False,
                     extra={"true_pids": true.tolist(), "camids": (np.maximum(true, 0) % 3).tolist()})   # one camera per identity
    keep, (qi, qp, qc), (gi, gp, gc) = held_out_split(LMDBDataset(out), 3)
    for q, cam in zip(qp, qc):
        assert any((gp == q) & (gc != cam)), "a query with no gallery match in another camera cannot be scored"
