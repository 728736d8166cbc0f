"""Tests of lupnl.finetune that a notebook cannot hold: BoT / MGN on BasicBlock and Bottleneck trunks, the losses
against brute force, P×K batches inside the real loop, initialisation from files, exact resume, the command line,
a real-data (CUHK03) smoke run and `papermill nbs/04_finetune.ipynb` end to end."""
import ast
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import conftest   # tests/conftest.py: HELP_WITHOUT_TORCH
import pytest
import torch
import torch.nn.functional as F
import torchvision

import lupnl.finetune as ft
from lupnl.heads import BoT, MGN
from lupnl.finetune import FinetuneConfig, batch_hard_triplet, build_loaders, build_model, label_smoothed_ce, load_benchmark, parse_config, train
from lupnl.checkpoints import export_backbone, imagenet_weights
from lupnl.models import resnet_trunk
from conftest import FT_TINY

torch.set_num_threads(1)  # small tensors on a shared 2-core machine: one thread per process is the fastest

REPO = Path(__file__).resolve().parents[1]
NB = REPO / "nbs" / "04_finetune.ipynb"
# tiny runs on the built-in benchmark: 15 identities, 64x32 crops, evaluation at the end only
TINY = {k: v for k, v in FT_TINY.items() if k != "epochs"}   # ft_finished's settings (conftest.py), any epochs


# ---------------------------------------------------------------- heads

@pytest.mark.parametrize("arch,channels", [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("head", ["bot", "mgn"])
def test_head_shapes_and_gradients(head, arch, channels):
    model, report = build_model(FinetuneConfig(model=head, arch=arch), num_classes=7)
    assert report is None
    x, y = torch.randn(4, 3, 64, 32), torch.tensor([0, 0, 1, 1])
    out = model.train()(x)
    if head == "bot":
        assert [l.shape for l in out["logits"]] == [(4, 7)]
        assert [f.shape for f in out["feats"]] == [(4, channels)]           # triplet on the pre-BN GAP feature
        eval_dim = channels                                                 # retrieval on the post-BN feature
    else:
        assert [l.shape for l in out["logits"]] == [(4, 7)] * 8            # CE on all 8 reduced features
        assert [f.shape for f in out["feats"]] == [(4, 256)] * 3           # triplet on the 3 global ones
        eval_dim = 8 * 256
    loss, ce, tri = ft.reid_losses(out, y, FinetuneConfig())
    loss.backward()
    assert math.isfinite(loss.item()) and ce.item() > 0
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []                                                    # every trainable weight is in the graph
    assert model.eval()(x[:2]).shape == (2, eval_dim)


def test_strides():
    "BoT: conv5 stride 1 doubles the map; MGN: global branch stride 2, part branches stride 1 (Bottleneck: conv2)."
    bot = BoT(resnet_trunk("resnet50"), 5)
    assert bot.backbone.layer4[0].conv2.stride == (1, 1) and bot.backbone.layer4[0].downsample[0].stride == (1, 1)
    mgn = MGN(resnet_trunk("resnet50"), 5)
    strides = [b[1][0].conv2.stride for b in mgn.branches]
    assert strides == [(2, 2), (1, 1), (1, 1)]
    x = torch.randn(1, 1024, 8, 4)
    assert [tuple(b[1](x).shape[2:]) for b in mgn.branches] == [(4, 2), (8, 4), (8, 4)]
    ids = {id(m) for b in mgn.branches for m in b.modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(ids) == 3 * sum(isinstance(m, torch.nn.Conv2d) for m in mgn.branches[0].modules())  # no shared weights


# ---------------------------------------------------------------- losses

def brute_force_triplet(feats, labels, margin):
    "Mean over anchors of the hinge (or softplus) of the farthest positive minus the nearest negative, pair by pair."
    n, losses = len(labels), []
    for a in range(n):
        pos = [torch.linalg.vector_norm(feats[a] - feats[p]) for p in range(n) if labels[p] == labels[a] and p != a]
        neg = [torch.linalg.vector_norm(feats[a] - feats[q]) for q in range(n) if labels[q] != labels[a]]
        gap = torch.stack(pos).max() - torch.stack(neg).min()
        losses.append(F.relu(gap + margin) if margin > 0 else F.softplus(gap))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("margin", [0.3, 1.2, 0.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_batch_hard_triplet_matches_brute_force(margin, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])[torch.randperm(12, generator=g)]   # unequal K
    feats = (torch.randn(12, 16, generator=g) * 0.3).requires_grad_()
    fast = batch_hard_triplet(feats, labels, margin)
    g_fast, = torch.autograd.grad(fast, feats)
    slow = brute_force_triplet(feats, labels, margin)
    g_slow, = torch.autograd.grad(slow, feats)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-4, atol=1e-6)


def test_triplet_is_zero_when_separated():
    feats = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
    assert batch_hard_triplet(feats, torch.tensor([0, 0, 1, 1]), 0.3).item() == 0.0
    assert batch_hard_triplet(feats, torch.tensor([0, 1, 0, 1]), 0.3).item() > 9


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothed_ce_formula(eps):
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(16, 9, generator=g) * 3, torch.randint(0, 9, (16,), generator=g)
    logp = logits.log_softmax(1)
    n = logits.shape[1]
    expected = sum(-(1 - eps) * logp[i, labels[i]] - eps / n * logp[i].sum() for i in range(16)) / 16
    torch.testing.assert_close(label_smoothed_ce(logits, labels, eps), expected, rtol=1e-5, atol=1e-6)
    assert label_smoothed_ce(logits.half(), labels, eps).dtype == torch.float32                   # AMP-safe


# ---------------------------------------------------------------- data in the loop

def test_pk_batches_in_training_loop(tmp_path, monkeypatch):
    "Every batch the loop trains on holds P identities x K images."
    seen, reid_losses = [], ft.reid_losses
    def recording(out, labels, cfg):
        seen.append(sorted(torch.bincount(labels)[torch.bincount(labels) > 0].tolist()))
        return reid_losses(out, labels, cfg)
    monkeypatch.setattr(ft, "reid_losses", recording)
    cfg = FinetuneConfig(**{**TINY, "P": 5, "K": 3}, epochs=1, out_dir=str(tmp_path), resume="never")
    _, rows = train(cfg)
    train_dl = build_loaders(cfg, load_benchmark(cfg))[0]
    assert len(seen) == len(train_dl) >= 3
    assert all(s == [3] * 5 for s in seen)
    assert "mAP" in rows[-1] and "rank1" in rows[-1]


# ---------------------------------------------------------------- initialisation

def test_init_from_files(tmp_path):
    torch.save(export_backbone(resnet_trunk("resnet18")), tmp_path / "backbone.pth")        # lupnl backbone.pth
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "torchvision.pth")    # torchvision, with fc
    src = resnet_trunk("resnet18")
    moco = {"state_dict": {f"module.encoder_q.{k}": v for k, v in src.state_dict().items()}}  # LUPerson (MoCo) layout
    moco["state_dict"]["module.encoder_k.conv1.weight"] = torch.zeros(1)
    torch.save(moco, tmp_path / "lup_moco.pth")
    for name in ("backbone.pth", "torchvision.pth", "lup_moco.pth"):
        for head in ("bot", "mgn"):
            model, report = build_model(FinetuneConfig(model=head, init=str(tmp_path / name)), num_classes=3)
            assert report.missing == [] and report.unexpected == [] and report.mismatched == []
            assert len(report.loaded) == len([k for k in src.state_dict()])
    model, _ = build_model(FinetuneConfig(model="mgn", init=str(tmp_path / "lup_moco.pth")), 3)
    assert torch.equal(model.stem[0].weight, src.conv1.weight)
    for branch in model.branches:                                           # every branch copy starts pre-trained
        assert torch.equal(branch[0][0].conv1.weight, src.layer3[1].conv1.weight)
        assert torch.equal(branch[1][1].conv2.weight, src.layer4[1].conv2.weight)


def test_init_wrong_arch_fails_clearly(tmp_path):
    torch.save(export_backbone(resnet_trunk("resnet50")), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="does not fit the resnet18 trunk"):
        build_model(FinetuneConfig(arch="resnet18", init=str(tmp_path / "r50.pth")), 3)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model(FinetuneConfig(init=str(tmp_path / "nowhere.pth")), 3)


def test_init_imagenet_needs_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_model(FinetuneConfig(init="imagenet"), 3)
    (tmp_path / "checkpoints").mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    _, report = build_model(FinetuneConfig(init="imagenet"), 3)
    assert report.missing == [] and report.source.endswith("resnet18-f37072fd.pth")



def test_init_from_safetensors(tmp_path):
    "Fine-tuning `init` reads the backbone.safetensors that pre-training writes (via lupnl.checkpoints.save_backbone)."
    from lupnl.checkpoints import save_backbone
    src = resnet_trunk("resnet18")
    pth, st = save_backbone(src, tmp_path)
    assert st.name == "backbone.safetensors" and st.is_file()
    for head in ("bot", "mgn"):
        model, report = build_model(FinetuneConfig(model=head, init=str(st)), num_classes=3)
        assert report.missing == [] and report.unexpected == [] and report.source == str(st)
        conv1 = model.backbone.conv1 if head == "bot" else model.stem[0]
        assert torch.equal(conv1.weight, src.conv1.weight)
    save_backbone(resnet_trunk("resnet50"), tmp_path / "r50")
    with pytest.raises(ValueError, match="does not fit the resnet18 trunk"):
        build_model(FinetuneConfig(init=str(tmp_path / "r50" / "backbone.safetensors")), 3)
    (tmp_path / "torn.safetensors").write_bytes(st.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        build_model(FinetuneConfig(init=str(tmp_path / "torn.safetensors")), 3)


# ---------------------------------------------------------------- ViT trunks

def test_vit_bot_shapes_and_gradients():
    "BoT on a timm ViT: class-token feature -> BNNeck -> classifier; gradients reach the patch embedding."
    from lupnl.models import build_trunk
    model = BoT(build_trunk("vit_small_patch16", depth=1), num_classes=7).train()
    out = model(torch.randn(8, 3, 32, 16))                               # 2x1 patches: timm's dynamic image size
    assert [l.shape for l in out["logits"]] == [(8, 7)] and [f.shape for f in out["feats"]] == [(8, 384)]
    loss, _, _ = ft.reid_losses(out, torch.arange(4).repeat_interleave(2), FinetuneConfig())
    loss.backward()
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.eval()(torch.randn(3, 3, 64, 32)).shape == (3, 384)
    m, report = build_model(FinetuneConfig(arch="vit_base_patch16", trunk_depth=1), 5)
    assert report is None and m.bnneck.num_features == 768 and len(m.backbone.blocks) == 1


def test_vit_refusals(tmp_path):
    "MGN and ImageNet weights are ResNet things: a ViT config says so at once; trunk_depth is a ViT knob only."
    from lupnl.models import ARCHS, VIT_ARCHS, build_trunk
    assert ft.ARCH_CHOICES == ARCHS + tuple(VIT_ARCHS)
    with pytest.raises(ValueError, match=r"MGN needs a ResNet trunk \(its branches copy layer3/layer4\); use --model bot"):
        FinetuneConfig(model="mgn", arch="vit_small_patch16")
    with pytest.raises(ValueError, match="MGN needs a ResNet trunk"):
        MGN(build_trunk("vit_small_patch16", depth=1), 3)
    with pytest.raises(ValueError, match="nothing is downloaded"):
        FinetuneConfig(arch="vit_base_patch16", init="imagenet")
    with pytest.raises(ValueError, match="nothing is downloaded"):
        imagenet_weights("vit_small_patch16")
    with pytest.raises(ValueError, match="trunk_depth is for ViT trunks only"):
        FinetuneConfig(trunk_depth=2)
    with pytest.raises(ValueError, match="vit_small_patch16"):
        FinetuneConfig(arch="vit_tiny")
    torch.save(export_backbone(resnet_trunk("resnet18")), tmp_path / "r18.pth")     # a ResNet file for a ViT: refused
    with pytest.raises(ValueError, match="does not fit the vit_small_patch16 trunk|only .* match"):
        build_model(FinetuneConfig(arch="vit_small_patch16", trunk_depth=1, init=str(tmp_path / "r18.pth")), 3)
    bad = subprocess.run([sys.executable, "-m", "lupnl.finetune", "--model", "mgn", "--arch", "vit_small_patch16",
                          "--out_dir", str(tmp_path / "x")], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "use --model bot" in bad.stderr and not (tmp_path / "x").exists()

def test_tensorboard_events(ft_finished):
    "Issue 22: fine-tuning logs each epoch's numbers and its curves.png to TensorBoard in its out_dir, beside metrics.jsonl."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(ft_finished.out_dir); acc.Reload()
    assert {"loss", "loss_ce", "loss_triplet", "acc_cls", "lr", "mAP", "rank1", "mINP"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("mAP")] == [0] and [i.step for i in acc.Images("curves")] == [0]


def test_lr_steps_follow_epochs(ft_finished):
    "Issue 22: lr_steps default to None, the reference's steps (BoT 40,70 of 120; MGN 40,60 of 80) scaled to the run, so the lr"
    " decays at --epochs 4 (the old default (5,) never did); explicit steps win; --help and the checkpoint say which."
    from lupnl.finetune import config_parser, resolve_config
    from lupnl.runs import learning_rate
    assert FinetuneConfig().lr_steps is None and parse_config([]).lr_steps is None
    four = resolve_config(FinetuneConfig(epochs=4))
    assert four.lr_steps == (1, 2) and learning_rate(four, 3.5) == pytest.approx(four.lr / 100)
    assert resolve_config(FinetuneConfig()).lr_steps == (2, 4) and resolve_config(FinetuneConfig(epochs=120)).lr_steps == (40, 70)
    assert resolve_config(FinetuneConfig(model="mgn", epochs=80)).lr_steps == (40, 60)
    assert resolve_config(parse_config(["--epochs", "4", "--lr_steps", "3"])).lr_steps == (3,)
    assert "BoT 40,70 of 120, MGN 40,60 of 80" in " ".join(config_parser().format_help().split())
    saved = torch.load(Path(ft_finished.out_dir) / "checkpoint.pth", weights_only=True)["config"]
    assert ft_finished.lr_steps is None and tuple(saved["lr_steps"]) == ()      # stored resolved: 1 epoch, no step
    assert "divided by 10 at epochs none (the bot reference's, scaled to 1 epochs)" in (Path(ft_finished.out_dir) / "log.txt").read_text()


# ---------------------------------------------------------------- resume

@pytest.mark.slow
def test_resume_continues_and_replays_exactly(tmp_path, ft_finished):
    a, b = tmp_path / "interrupted", tmp_path / "straight"
    shutil.copytree(ft_finished.out_dir, a)                             # the shared finished 1-epoch run, copied: resumed here
    assert replace(ft_finished, out_dir=str(a)) == FinetuneConfig(**TINY, epochs=1, out_dir=str(a))
    ckpt = torch.load(a / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1
    with pytest.raises(ValueError, match=r"(?s)lr_steps: \(\) in the checkpoint, \(1,\) now.*follow epochs when left None.*--lr_steps ''"):
        train(FinetuneConfig(**TINY, epochs=2, out_dir=str(a)))       # lr_steps None: the 2-epoch run's would differ
    model_a, rows_a = train(FinetuneConfig(**TINY, epochs=2, lr_steps=(), out_dir=str(a)))   # resume="auto": one more epoch
    assert [r["epoch"] for r in rows_a] == [0, 1]
    log = (a / "log.txt").read_text()
    assert "resumed from" in log and log.count("epoch=1 ") == 1 and log.count("epoch=0 ") == 1
    model_b, rows_b = train(FinetuneConfig(**TINY, epochs=2, lr_steps=(), out_dir=str(b)))
    for (k, va), vb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=f"resumed != uninterrupted at {k}")
    assert rows_a[-1]["mAP"] == rows_b[-1]["mAP"]
    with pytest.raises(ValueError, match="different run"):
        train(FinetuneConfig(**TINY, epochs=3, arch="resnet34", out_dir=str(a)))
    torch.save(dict(epoch=1, model={}, config=dict(arch="resnet18")), tmp_path / "pretrain_checkpoint.pth")
    with pytest.raises(ValueError, match="not a fine-tuning checkpoint"):
        train(FinetuneConfig(**TINY, out_dir=str(tmp_path / "c"), resume=str(tmp_path / "pretrain_checkpoint.pth")))


# ---------------------------------------------------------------- command line

@pytest.mark.slow
def test_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base = [sys.executable, "-m", "lupnl.finetune", "--out_dir", str(tmp_path / "cli"), "--epochs", "1",
            "--id-ratio", "0.2", "--P", "4", "--K", "2", "--img_size", "64x32"]
    torch.save(export_backbone(resnet_trunk("resnet50")), tmp_path / "r50.pth")
    bad = subprocess.run(base + ["--init", str(tmp_path / "r50.pth")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode != 0 and "does not fit the resnet18 trunk" in bad.stderr
    ok = subprocess.run(base + ["--model", "mgn"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and "mAP" in rows[0]
    assert parse_config(["--model", "mgn", "--img_size", "384x128"]).img_size == (384, 128)


# ---------------------------------------------------------------- real data

@pytest.mark.slow
def test_cuhk03_smoke(shared_data, tmp_path):
    "The real CUHK03 pair: 400 training identities, camera-A queries vs camera-B gallery; a tiny run end to end."
    cfg = FinetuneConfig(data=str(shared_data / "cuhk03-labeled-pair1"), out_dir=str(tmp_path), epochs=1, id_ratio=0.05,
                         P=8, K=4, img_size=(64, 32))
    bench = load_benchmark(cfg)
    assert len({i.pid for i in bench.train}) == 400
    assert {i.camid for i in bench.query} == {0} and {i.camid for i in bench.gallery} == {1}
    _, rows = train(cfg)
    assert 0 < rows[-1]["mAP"] <= 100


# ---------------------------------------------------------------- papermill

def _parameters_cell(nb_path):
    nb = json.loads(nb_path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "exactly one papermill parameters cell"
    return {(n.targets[0] if isinstance(n, ast.Assign) else n.target).id: ast.literal_eval(n.value)
            for n in ast.parse("".join(cells[0]["source"])).body if isinstance(n, (ast.Assign, ast.AnnAssign))}


def test_parameters_cell_is_the_config():
    params = _parameters_cell(NB)
    assert params.pop("run_real") is None                     # the notebook's switch, not a config field
    defaults = asdict(FinetuneConfig())
    assert list(params) == [f.name for f in fields(FinetuneConfig)]
    assert FinetuneConfig(**params) == FinetuneConfig() and len(params) == len(defaults)


@pytest.mark.slow
def test_papermill_defaults(tmp_path):
    out_dir = tmp_path / "run"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "papermill", str(NB), str(tmp_path / "out.ipynb"), "-p", "out_dir", str(out_dir)],
                   check=True, capture_output=True, cwd=REPO, env={**os.environ, "MPLBACKEND": "Agg"})
    print(f"papermill 04_finetune with defaults: {time.time() - t0:.0f}s")
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    cfg = FinetuneConfig()
    assert [r["epoch"] for r in rows] == list(range(cfg.epochs))
    assert {"mAP", "rank1", "mINP"} <= set(rows[-1])
    assert (out_dir / "checkpoint.pth").is_file() and (out_dir / "curves.png").is_file()
    assert "init=random" in (out_dir / "log.txt").read_text()


def test_help_answers_before_torch_and_explains():
    "`python -m lupnl.finetune --help` answers before torch is imported, with each field's doc, choices and reference value."
    res = subprocess.run([sys.executable, "-c", conftest.HELP_WITHOUT_TORCH, "lupnl.finetune"], capture_output=True, text=True, check=True)
    assert res.stdout.rstrip().endswith("torch imported: False"), res.stdout[-300:]
    text = " ".join(res.stdout.split())
    assert "one of: bot, mgn" in text and "reference: BoT 3.5e-4 (adam), MGN 1e-2 (sgd)" in text


def test_papermill_unknown_parameter_fails(tmp_path):
    res = subprocess.run([sys.executable, "-m", "papermill", str(NB), str(tmp_path / "out.ipynb"), "-p", "out_dir",
                          str(tmp_path / "run"), "-p", "modle", "mgn"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "MPLBACKEND": "Agg"})
    assert res.returncode != 0 and "unknown parameter 'modle' (did you mean 'model'?)" in res.stdout + res.stderr
    assert not (tmp_path / "run").exists()
