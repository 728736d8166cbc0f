"""Tests of lupnl.models that a notebook cannot hold: the prototype update against the reference loop at scale,
a real 2-process gloo DDP run (queue / prototypes / key encoder identical across ranks, shuffle-BN), and checkpoint
I/O in the key layouts of the released LUPerson / LUPerson-NL files and of lupnl's own files."""
import argparse
import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

from lupnl.pnl import PNL, batch_shuffle_ddp, batch_unshuffle_ddp, concat_all_gather, update_prototypes_, update_prototypes_loop_
from lupnl.models import Encoder
from lupnl.checkpoints import export_backbone, load_pretrained

torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine


# ---------------------------------------------------------------- prototypes

@pytest.mark.parametrize("m", [0.999, 0.9, 0.5])
def test_update_prototypes_equals_loop(m):
    g = torch.Generator().manual_seed(0)
    C, B, D = 1000, 512, 32
    P0 = F.normalize(torch.randn(C, D, generator=g), dim=1)
    P0[900:] = 0                                                       # never-seen identities
    feats = F.normalize(torch.randn(B, D, generator=g), dim=1)
    labels = torch.randint(0, 60, (B,), generator=g)                   # ~8 occurrences per label
    labels[::7] = 5                                                    # one label ~80 times, spread over the batch
    labels[-3:] = torch.tensor([950, 950, 999])                        # zero rows touched
    P_loop, P_vec = P0.clone(), P0.clone()
    update_prototypes_loop_(P_loop, feats, labels, m)
    update_prototypes_(P_vec, feats, labels, m)
    torch.testing.assert_close(P_vec, P_loop, rtol=1e-5, atol=1e-6)
    touched = torch.zeros(C, dtype=torch.bool); touched[labels] = True
    assert torch.equal(P_vec[~touched], P0[~touched])                  # untouched rows are not rewritten
    torch.testing.assert_close(P_vec[touched].norm(dim=1), torch.ones(int(touched.sum())))


def test_update_prototypes_half_features_and_empty_batch():
    "AMP gives fp16 embeddings: they are accumulated in the prototypes' fp32 (= the loop on upcast features); an empty batch is a no-op."
    g = torch.Generator().manual_seed(1)
    P0 = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    feats = F.normalize(torch.randn(200, 16, generator=g), dim=1).half()
    labels = torch.randint(0, 10, (200,), generator=g)
    P_loop, P_vec = P0.clone(), P0.clone()
    update_prototypes_loop_(P_loop, feats.float(), labels, 0.99)
    update_prototypes_(P_vec, feats, labels, 0.99)
    assert P_vec.dtype == torch.float32
    torch.testing.assert_close(P_vec, P_loop, rtol=1e-5, atol=1e-6)
    update_prototypes_(P_vec, feats[:0], labels[:0], 0.99)
    torch.testing.assert_close(P_vec, P_loop, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DDP

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_on_all_ranks(name, t):
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    for r, other in enumerate(gathered):
        assert torch.equal(other, gathered[0]), f"{name} differs between rank 0 and rank {r}"


def _ddp_worker(rank, world, port, steps, result_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # shuffle-BN: the pair is a permutation of the global batch and its inverse
        x = (torch.arange(4.) + 10 * rank)[:, None]
        xs, idx = batch_shuffle_ddp(x)
        assert torch.equal(batch_unshuffle_ddp(xs, idx), x)
        allx = concat_all_gather(xs).flatten().sort().values
        assert torch.equal(allx, torch.tensor([0., 1, 2, 3, 10, 11, 12, 13]))

        torch.manual_seed(1000 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
        model = PNL("resnet18", num_classes=10, dim=16, queue_size=20, cls_dim=32, proj_hidden=64, m=0.9, proto_m=0.9)
        ddp = DDP(model, broadcast_buffers=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(rank)  # different data per rank
        for step in range(steps):
            im_q, im_k = torch.randn(4, 3, 32, 16, generator=g), torch.randn(4, 3, 32, 16, generator=g)
            labels = torch.randint(0, 5, (4,), generator=g) + 5 * rank    # rank 0: ids 0-4, rank 1: ids 5-9
            index = torch.arange(4) + 100 * step + 1000 * rank
            out = ddp(im_q, im_k, labels, index=index, correct=step >= 1, label_guided=step >= 1)
            opt.zero_grad(); out["loss"].backward(); opt.step()
            assert torch.isfinite(out["loss"]).item()
            assert torch.equal(out["all_index"][4 * rank:4 * rank + 4], index)
            assert torch.equal(out["all_targets"][4 * rank:4 * rank + 4], out["targets"])
        for name in ("queue", "queue_labels", "queue_ptr", "prototypes"):
            _same_on_all_ranks(name, getattr(model, name))
        for name, p in model.encoder_k.named_parameters(): _same_on_all_ranks(f"encoder_k.{name}", p.detach())
        for name, p in model.encoder_q.named_parameters(): _same_on_all_ranks(f"encoder_q.{name}", p.detach())
        bb = export_backbone(ddp)
        for name, t in bb.items():
            if "running" not in name and "num_batches" not in name: _same_on_all_ranks(f"backbone.{name}", t)
        if rank == 0:
            torch.save({"queue_labels": model.queue_labels.clone(), "queue_ptr": model.queue_ptr.clone(),
                        "touched": (model.prototypes.norm(dim=1) > 0).clone(), "loss": out["loss"].item()}, result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_keep_buffers_identical(tmp_path):
    steps, result = 3, tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), steps, str(result)), nprocs=2, join=True)
    r = torch.load(result, weights_only=True)
    assert r["queue_ptr"].item() == (steps * 8) % 20                        # 24 keys into a queue of 20: wrapped
    qlabels = set(r["queue_labels"].tolist())
    assert -1 not in qlabels                                                # queue full
    assert qlabels & set(range(5)) and qlabels & set(range(5, 10))         # keys of both ranks
    assert r["touched"][:5].any() and r["touched"][5:].any()               # prototypes of both ranks' identities


# ---------------------------------------------------------------- checkpoints

def _tv_state(arch, seed=0):
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)().state_dict()


def _lup_moco_file(path, arch="resnet50"):
    "LUPerson release layout (MoCo v2 main_moco.py): {'epoch','arch','state_dict','optimizer'} with module.encoder_q/k."
    sd = _tv_state(arch)
    dim_in = sd["fc.weight"].shape[1]
    state = {}
    for k, v in sd.items():
        if k.startswith("fc."): continue
        state[f"module.encoder_q.{k}"] = v
        state[f"module.encoder_k.{k}"] = v.clone()
    for enc in ("encoder_q", "encoder_k"):
        state.update({f"module.{enc}.fc.0.weight": torch.randn(dim_in, dim_in), f"module.{enc}.fc.0.bias": torch.zeros(dim_in),
                      f"module.{enc}.fc.2.weight": torch.randn(128, dim_in), f"module.{enc}.fc.2.bias": torch.zeros(128)})
    state["module.queue"] = F.normalize(torch.randn(128, 64), dim=0)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 200, "arch": arch, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _lupnl_release_state(arch="resnet18"):
    "LUPerson-NL (PNL) layout: module.encoder_q.{conv1..layer4, embed_fc, classifier, fc1, fc2}, encoder_k, queue, prototypes."
    sd = _tv_state(arch, seed=1)
    d = sd["fc.weight"].shape[1]
    state = {}
    for enc in ("encoder_q", "encoder_k"):
        for k, v in sd.items():
            if not k.startswith("fc."): state[f"module.{enc}.{k}"] = v.clone()
        state.update({f"module.{enc}.embed_fc.weight": torch.randn(256, d), f"module.{enc}.embed_fc.bias": torch.zeros(256),
                      f"module.{enc}.classifier.weight": torch.randn(30, 256), f"module.{enc}.classifier.bias": torch.zeros(30),
                      f"module.{enc}.fc1.weight": torch.randn(2048, d), f"module.{enc}.fc1.bias": torch.zeros(2048),
                      f"module.{enc}.fc2.weight": torch.randn(128, 2048), f"module.{enc}.fc2.bias": torch.zeros(128)})
    state.update({"module.queue": torch.randn(128, 64), "module.queue_id": -torch.ones(64, 1, dtype=torch.long),
                  "module.queue_ptr": torch.zeros(1, dtype=torch.long), "module.prototypes": torch.randn(30, 128)})
    return state, {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _assert_trunk_equals(trunk, expected):
    got = trunk.state_dict()
    for k, v in expected.items(): assert torch.equal(got[k], v), k


def test_load_luperson_moco_release_resnet50(tmp_path, capsys):
    expected = _lup_moco_file(tmp_path / "lup_moco_r50.pth")
    enc = Encoder("resnet50", num_classes=0)
    rep = load_pretrained(enc, tmp_path / "lup_moco_r50.pth")
    assert rep.missing == [] and rep.unexpected == [] and rep.mismatched == []
    assert len(rep.loaded) == len(expected)
    assert all(k.startswith(("module.encoder_k.", "module.encoder_q.fc.", "module.queue")) for k in rep.ignored)
    _assert_trunk_equals(enc.trunk, expected)
    assert "lup_moco_r50.pth" in capsys.readouterr().out              # the report is printed


@pytest.mark.parametrize("wrapped", [True, False])
def test_load_luperson_nl_release_into_pnl(tmp_path, wrapped):
    state, expected = _lupnl_release_state("resnet18")
    path = tmp_path / "lupnl_r18.pth"
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state} if wrapped else state, path)
    model = PNL("resnet18", num_classes=7, dim=16, queue_size=32, cls_dim=0)
    queue0 = model.queue.clone()
    rep = load_pretrained(model, path, verbose=False)
    assert rep.missing == [] and rep.unexpected == [] and len(rep.loaded) == len(expected)
    _assert_trunk_equals(model.encoder_q.trunk, expected)
    _assert_trunk_equals(model.encoder_k.trunk, expected)                 # key encoder re-synced from the query
    assert torch.equal(model.queue, queue0)                                # buffers of the file are not loaded


def test_load_lupnl_checkpoint_and_backbone(tmp_path):
    src = PNL("resnet18", num_classes=5, dim=16, queue_size=32, cls_dim=32)
    with torch.no_grad():
        for p in src.encoder_q.trunk.parameters(): p.add_(torch.randn_like(p))
    expected = export_backbone(src)
    torch.save({"model": src.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 4},
               tmp_path / "checkpoint.pth")
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 4}, tmp_path / "ddp_checkpoint.pth")
    torch.save(expected, tmp_path / "backbone.pth")
    for name in ("checkpoint.pth", "ddp_checkpoint.pth", "backbone.pth"):
        for target in (Encoder("resnet18", num_classes=3, cls_dim=0, proj_dim=8), torchvision.models.resnet18()):
            rep = load_pretrained(target, tmp_path / name, verbose=False)
            trunk = target.trunk if isinstance(target, Encoder) else target
            assert [k for k in rep.missing if not k.startswith("fc.")] == [] and rep.unexpected == [], name
            _assert_trunk_equals(trunk, expected)


def test_wrong_architecture_fails_and_loads_nothing(tmp_path):
    _lup_moco_file(tmp_path / "r50.pth", "resnet50")
    r18 = Encoder("resnet18")
    before = {k: v.clone() for k, v in r18.trunk.state_dict().items()}
    with pytest.raises(ValueError, match=r"r50\.pth.*does not fit the resnet18 trunk.*shape mismatch"):
        load_pretrained(r18, tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"only \d+% of the resnet18 trunk.s weights match"):
        load_pretrained(r18, tmp_path / "r50.pth", strict_arch=False)
    _assert_trunk_equals(r18.trunk, before)
    # same block type, other depth: shapes agree, but keys are extra (r34 -> r18) or missing (r18 -> r34)
    with pytest.raises(ValueError, match="extra trunk keys"):
        load_pretrained(Encoder("resnet18"), _tv_state("resnet34"))
    with pytest.raises(ValueError, match="trunk keys missing"):
        load_pretrained(Encoder("resnet34"), _tv_state("resnet18"))
    rep = load_pretrained(Encoder("resnet18"), _tv_state("resnet34"), strict_arch=False, verbose=False)
    assert rep.unexpected and not rep.missing                               # non-strict: report, load what fits


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_pretrained(Encoder("resnet18"), tmp_path / "missing.pth")
    torch.save({"epoch": 3, "arch": "resnet18"}, tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match="no_weights.pth.*no state dict"):
        load_pretrained(Encoder("resnet18"), tmp_path / "no_weights.pth")
    torch.save({"state_dict": _tv_state("resnet18"), "args": argparse.Namespace(lr=0.4)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="pickled.pth.*weights_only=True"):
        load_pretrained(Encoder("resnet18"), tmp_path / "pickled.pth")


def test_export_backbone_round_trip_into_torchvision_resnet50():
    model = PNL("resnet50", num_classes=4, dim=16, queue_size=16, cls_dim=8).eval()
    sd = export_backbone(model)
    tv = torchvision.models.resnet50()
    res = tv.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    tv.fc = nn.Identity()
    tv.eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(F.normalize(tv(x), dim=1), model(x))
    assert all(v.device.type == "cpu" and not v.requires_grad for v in sd.values())


# ---------------------------------------------------------------- the step: same results as before the fused head

from reference_pnl import _forward_v0   # tests/reference_pnl.py: the frozen previous step (pytest puts tests/ on sys.path)


def _compare_steps(model, steps, schedule, seed=0):
    """Train `model` for `steps` SGD steps with its own forward; at every step run the frozen previous forward on a
    copy of the same state and compare. (Comparing two whole trajectories would not do: at this tiny scale a 1e-7
    change of the weights grows to 1e-2 in the losses within 3 steps, for the previous forward against itself.)"""
    import copy
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fired = partial = False
    for step in range(steps):
        im_q, im_k = torch.randn(8, 3, 32, 16, generator=g), torch.randn(8, 3, 32, 16, generator=g)
        labels = torch.randint(0, 6, (8,), generator=g)
        old = copy.deepcopy(model)
        torch.manual_seed(100 + step); b = _forward_v0(old, im_q, im_k, labels, **schedule(step))
        torch.manual_seed(100 + step); a = model(im_q, im_k, labels, **schedule(step))
        opt.zero_grad(); a["loss"].backward(); b["loss"].backward()
        for key in ("loss", "loss_cls", "loss_proto", "loss_inst", "acc_inst", "acc_cls"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{key} at step {step}: {m}")
        for key in ("targets", "corrected"):
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), f"{key} at step {step}"
        for key, v in old.state_dict().items():
            if key.startswith(("queue", "prototypes")): torch.testing.assert_close(getattr(model, key), v, rtol=1e-5, atol=1e-6)
        grads_old = dict(old.named_parameters())
        for name, p in model.named_parameters():
            if p.grad is not None: torch.testing.assert_close(p.grad, grads_old[name].grad, rtol=1e-4, atol=1e-5)
        opt.step()
        fired |= bool(a["corrected"] is not None and a["corrected"].any())
        partial |= bool(a["corrected"] is not None and 0 < a["corrected"].sum() < len(a["corrected"]))
    return fired, partial


@pytest.mark.parametrize("preset", ["pnl", "ce", "moco", "no_proto", "no_correction", "no_label_guided", "no_instance"])
@pytest.mark.parametrize("cls_dim", [0, 8])
def test_step_equals_frozen_copy_of_previous_forward(preset, cls_dim):
    """The fused head and the double-buffered tables give the previous step's losses, targets, buffers and gradients,
    with the previous settings passed explicitly (the defaults changed for parity: no bottleneck BN, noisy-label positives)."""
    torch.manual_seed(0)
    m = PNL.ablation(preset, arch="resnet18", num_classes=6, dim=16, queue_size=20, cls_dim=cls_dim, proj_hidden=32,
                     m=0.9, proto_m=0.5, threshold=0.4, cls_bn=True, guided_label="corrected")
    if cls_dim and m.encoder_q.bottleneck is not None: assert isinstance(m.encoder_q.bottleneck[1], nn.BatchNorm1d)
    if m.encoder_q.classifier is not None:                                 # a confident classifier: some rows pass
        with torch.no_grad(): m.encoder_q.classifier.weight.mul_(20)
    fired, partial = _compare_steps(m, 6, lambda s: dict(proto=s >= 1, correct=s >= 2, label_guided=s >= 3))
    if cls_dim: return                                                     # the BN bottleneck: equality is the point
    assert fired == (preset in ("pnl", "no_proto", "no_label_guided", "no_instance")), "the correction must fire where it is on"
    assert partial == fired, "some rows corrected, some not: the row bound is exercised"


def test_tables_are_not_copied_and_backward_sees_the_step_table():
    "No per-step clone: the live tables are used by the loss; their update goes to the spare, so backward still works."
    torch.manual_seed(0)
    m = PNL("resnet18", num_classes=6, dim=8, queue_size=16, cls_dim=0, proj_hidden=16)
    x, y = torch.randn(4, 3, 32, 16), torch.tensor([0, 1, 2, 3])
    o1 = m(x, x, y)
    p_step1 = m.prototypes
    o2 = m(x, x, y)                                                        # step 2 writes the spare = step 1's table?
    assert m.prototypes is not p_step1                                     # no: step 1's table is now the spare...
    o2["loss"].backward()                                                  # ...and step 2's graph holds the live one
    o3 = m(x, x, y)                                                        # writes step 2's spare = step 1's table
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o1["loss"].backward()                                              # too late: autograd refuses, never wrong
    o3["loss"].backward()
    big = PNL("resnet18", num_classes=200_000, dim=8, queue_size=16, cls_dim=0, proj_hidden=16, use_cls=True)
    big(x, x, y); big(x, x, y)
    import time
    def best(f, n=5):                                                      # min of a few: robust on a loaded machine
        ts = []
        for _ in range(n): t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        return min(ts)
    t_rows = best(lambda: big._write_table_("prototypes", lambda p: p.new_zeros(0, dtype=torch.long)))
    t_clone = best(lambda: big.prototypes.clone())
    assert t_rows < t_clone, (t_rows, t_clone)                             # only last step's rows were copied


# ---------------------------------------------------------------- safetensors, fine-tuning checkpoints, bad files

def test_backbone_safetensors_loads_into_torchvision_and_load_pretrained(tmp_path):
    from safetensors.torch import load_file
    from lupnl.checkpoints import save_backbone
    src = PNL("resnet18", num_classes=5, dim=16, queue_size=32, cls_dim=32)
    with torch.no_grad():
        for p in src.encoder_q.trunk.parameters(): p.add_(torch.randn_like(p))
    pth, st = save_backbone(src, tmp_path / "run")
    assert st.name == "backbone.safetensors" and pth.name == "backbone.pth" and not list((tmp_path / "run").glob("*.tmp"))
    sd = load_file(str(st))
    tv = torchvision.models.resnet18()
    res = tv.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    expected = export_backbone(src)
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)
    for f in (st, pth):
        enc = Encoder("resnet18", num_classes=3, cls_dim=0, proj_dim=8)
        rep = load_pretrained(enc, f, verbose=False)
        assert rep.missing == [] and rep.unexpected == [] and rep.ignored == []
        _assert_trunk_equals(enc.trunk, expected)


def test_finetuning_checkpoints_are_inits(tmp_path):
    "BoT stores the trunk under `backbone.`, MGN splits it into a stem and a global branch (+ 2 branch copies, ignored)."
    from lupnl.models import resnet_trunk
    from lupnl.heads import BoT, MGN
    for cls in (BoT, MGN):
        torch.manual_seed(0)
        trunk = resnet_trunk("resnet18")
        with torch.no_grad():
            for p in trunk.parameters(): p.add_(torch.randn_like(p))
        expected = {k: v.clone() for k, v in trunk.state_dict().items()}
        model = cls(trunk, num_classes=7)
        if hasattr(model, "branches"):                                     # the branch copies drift in fine-tuning
            with torch.no_grad():
                for p in model.branches[1].parameters(): p.add_(1.)
        torch.save({"epoch": 3, "model": model.state_dict(), "num_classes": 7}, tmp_path / "ft.pth")
        target = torchvision.models.resnet18()
        rep = load_pretrained(target, tmp_path / "ft.pth", verbose=False)
        assert [k for k in rep.missing if not k.startswith("fc.")] == [] and rep.unexpected == [], cls.__name__
        _assert_trunk_equals(target, expected)
        if hasattr(model, "branches"): assert any(k.startswith("branches.1.") for k in rep.ignored)


def test_empty_and_onnx_files_give_clear_errors(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pth is empty \(0 bytes, an empty file\)"):
        load_pretrained(Encoder("resnet18"), tmp_path / "empty.pth")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        load_pretrained(Encoder("resnet18"), tmp_path / "empty.safetensors")
    try:                                                                   # a real ONNX export when the exporter works
        torch.onnx.export(nn.Linear(3, 2).eval(), (torch.randn(1, 3),), str(tmp_path / "model.onnx"), dynamo=False)
    except Exception:                                                      # else the first bytes of one
        (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x032.0:\x00")
    (tmp_path / "model.bin").write_bytes((tmp_path / "model.onnx").read_bytes())   # renamed: found by content
    for name in ("model.onnx", "model.bin"):
        with pytest.raises(ValueError, match="this is an ONNX model, not a lupnl checkpoint: evaluate it with `lupnl.checkpoints.OnnxModel`"):
            load_pretrained(Encoder("resnet18"), tmp_path / name)


# ---------------------------------------------------------------- ViT trunks (timm)

def test_vit_pnl_step_export_and_reload(tmp_path):
    pytest.importorskip("timm")                                            # a dev requirement: installed in CI
    import timm
    from safetensors.torch import load_file
    from lupnl.models import build_trunk
    from lupnl.checkpoints import save_backbone
    torch.manual_seed(0)
    tk = dict(depth=1)                                                     # test-only: one block
    m = PNL("vit_small_patch16", num_classes=6, dim=16, queue_size=16, cls_dim=32, proj_hidden=32, trunk_kwargs=tk)
    x, y = torch.randn(4, 3, 32, 16), torch.tensor([0, 1, 2, 3])          # 2 x 1 patches
    out = m(x, x, y, correct=True, label_guided=True)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    m.eval(); assert m(x).shape == (4, 384); m.train()
    pth, st = save_backbone(m, tmp_path)
    sd = load_file(str(st))
    assert "blocks.0.attn.qkv.weight" in sd and "pos_embed" in sd                           # timm's names
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=(256, 128), depth=1)
    ref.load_state_dict(sd, strict=True)                                   # plain timm takes the file as it is
    for f in (st, pth):
        dst = Encoder("vit_small_patch16", trunk_kwargs=tk)
        rep = load_pretrained(dst, f, verbose=False)
        assert rep.missing == [] and rep.unexpected == []
        assert torch.equal(dst.trunk.blocks[0].mlp.fc1.weight, m.backbone.blocks[0].mlp.fc1.weight)
    with pytest.raises(ValueError, match="extra trunk keys"):              # a deeper ViT's file does not fit
        load_pretrained(Encoder("vit_small_patch16", trunk_kwargs=tk),
                        build_trunk("vit_small_patch16", depth=2).state_dict(), verbose=False)
    with pytest.raises(ValueError, match="does not fit|match"):            # nor a ResNet's
        load_pretrained(Encoder("vit_small_patch16", trunk_kwargs=tk),
                        torchvision.models.resnet18().state_dict(), verbose=False)


def test_vit_without_timm_says_pip_install_timm(monkeypatch):
    import sys
    from lupnl.models import build_trunk
    monkeypatch.setitem(sys.modules, "timm", None)                         # import timm -> ImportError
    with pytest.raises(ImportError, match="pip install timm"):
        build_trunk("vit_base_patch16")
    build_trunk("resnet18")                                                # ResNets never need it


# ---------------------------------------------------------------- double-buffered tables: resume, rollback, .to()

def _resume_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 16, generator=g), torch.randn(8, 3, 32, 16, generator=g),
             torch.randint(0, 6, (8,), generator=g)) for _ in range(n)]


def _train_steps(model, opt, batches, first_step):
    "SGD steps over `batches` with the full schedule on (correction, label-guided); the RNG reseeded per step (shuffle-BN)."
    outs = []
    for i, (im_q, im_k, y) in enumerate(batches):
        torch.manual_seed(1000 + first_step + i)
        out = model(im_q, im_k, y, proto=True, correct=True, label_guided=True)
        opt.zero_grad(); out["loss"].backward(); opt.step()
        outs.append({k: out[k].detach().clone() for k in ("loss", "targets", "corrected")})
    return outs


def _new_pnl(queue_size=12):
    m = PNL("resnet18", num_classes=6, dim=16, queue_size=queue_size, cls_dim=0, proj_hidden=32, m=0.9, proto_m=0.5, threshold=0.4)
    with torch.no_grad(): m.encoder_q.classifier.weight.mul_(20)          # confident: some labels get corrected
    return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)


def _assert_same_run(outs_a, outs_b, model_a, model_b):
    for s, (a, b) in enumerate(zip(outs_a, outs_b)):
        for k in a: assert torch.equal(a[k], b[k]), f"{k} differs at step {s} after the resume"
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa: assert torch.equal(sa[k], sb[k]), f"state {k} differs"


def test_resume_from_state_dict_mid_training_is_bit_identical(tmp_path):
    "A checkpoint written mid-run (queue 12 < 5 steps x 8 keys: it wraps) loads into a fresh model that then steps exactly as the original."
    torch.manual_seed(0)
    model, opt = _new_pnl()
    batches = _resume_batches(7)
    _train_steps(model, opt, batches[:4], 0)                               # the spares are warm: incremental copies
    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict()), tmp_path / "ckpt.pth")
    ref = _train_steps(model, opt, batches[4:], 4)                         # the uninterrupted run
    torch.manual_seed(123)                                                 # another init: everything must come from the file
    fresh, fresh_opt = _new_pnl()
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    fresh.load_state_dict(ckpt["model"]); fresh_opt.load_state_dict(ckpt["optimizer"])
    resumed = _train_steps(fresh, fresh_opt, batches[4:], 4)
    assert any(o["corrected"].any() for o in ref), "the correction must fire, or the targets compare nothing"
    _assert_same_run(ref, resumed, model, fresh)


def test_load_state_dict_into_the_running_model_invalidates_the_spare():
    """Rolling a running model back (load_state_dict into its live tables) must not reuse the spare's stale rows.
    Queue 20, batch 8, 3 steps rolled back: the spare is stale in rows that the next step neither copies nor writes."""
    torch.manual_seed(0)
    model, opt = _new_pnl(queue_size=20)
    batches = _resume_batches(9)
    _train_steps(model, opt, batches[:3], 0)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    snap_opt = copy.deepcopy(opt.state_dict())
    _train_steps(model, opt, batches[3:6], 3)                              # the tables move on (and their spares)
    model.load_state_dict(snap); opt.load_state_dict(copy.deepcopy(snap_opt))   # back to step 3, in place
    again = _train_steps(model, opt, batches[6:], 3)                      # (optimizers may alias a loaded state)
    torch.manual_seed(123)
    fresh, fresh_opt = _new_pnl(queue_size=20)
    fresh.load_state_dict(snap); fresh_opt.load_state_dict(copy.deepcopy(snap_opt))
    _assert_same_run(_train_steps(fresh, fresh_opt, batches[6:], 3), again, fresh, model)


def test_to_dtype_round_trip_mid_training_keeps_the_run():
    "`.to()` replaces the buffers (the spares are then rebuilt): a float64 -> float32 round trip changes nothing."
    torch.manual_seed(0)
    model, opt = _new_pnl()
    batches = _resume_batches(6)
    _train_steps(model, opt, batches[:3], 0)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9); twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    queue_before = twin.queue
    twin.to(torch.float64).to(torch.float32)
    assert twin.queue is not queue_before and twin.queue.dtype == torch.float32
    _assert_same_run(_train_steps(model, opt, batches[3:], 3), _train_steps(twin, twin_opt, batches[3:], 3), model, twin)


# ---------------------------------------------------------------- parity switches and extensions (issue 11)

def _tiny(**kw):
    torch.manual_seed(0)
    return PNL("resnet18", num_classes=6, dim=16, queue_size=20, cls_dim=8, proj_hidden=32, m=0.9, proto_m=0.5, **kw)


def test_default_bottleneck_has_no_batchnorm_as_the_reference():
    m = _tiny()
    assert [type(l) for l in m.encoder_q.bottleneck] == [nn.Linear, nn.ReLU]
    assert m.guided_label == "noisy" and m.T_correct == m.T and m.encoder_q.proj_inst is None


def test_inst_head_separates_the_gradients_of_the_two_embeddings():
    "With `inst_head` the instance loss trains `proj_inst` only and the prototype loss `proj` only; both train the trunk."
    g = torch.Generator().manual_seed(0)
    im_q, im_k, y = torch.randn(8, 3, 32, 16, generator=g), torch.randn(8, 3, 32, 16, generator=g), torch.randint(0, 6, (8,), generator=g)
    for w_proto, w_inst, live, dead in ((0.0, 1.0, "proj_inst", "proj."), (1.0, 0.0, "proj.", "proj_inst")):
        m = _tiny(inst_head=True, w_cls=0.0, w_proto=w_proto, w_inst=w_inst)
        with torch.no_grad(): m(im_q, im_k, y)                             # prototypes set
        m.zero_grad(); m(im_q, im_k, y)["loss"].backward()
        grads = {n: p.grad for n, p in m.encoder_q.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(live)), live
        assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith(dead)), dead
        assert grads["trunk.conv1.weight"].abs().sum() > 0


def test_inst_head_checkpoint_round_trip_and_backbone_load(tmp_path):
    "A PNL with `inst_head` reloads into the same configuration; `proj_inst` is a known non-trunk key when loading a trunk."
    src = _tiny(inst_head=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad(): src(torch.randn(8, 3, 32, 16, generator=g), torch.randn(8, 3, 32, 16, generator=g), torch.arange(8) % 6)
    torch.save({"model": src.state_dict()}, tmp_path / "checkpoint.pth")
    dst = _tiny(inst_head=True)
    dst.load_state_dict(torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"])
    for k, v in src.state_dict().items(): assert torch.equal(dst.state_dict()[k], v), k
    rep = load_pretrained(Encoder("resnet18"), tmp_path / "checkpoint.pth", verbose=False)
    assert rep.unexpected == [] and any("proj_inst" in k for k in rep.ignored)
    with pytest.raises(RuntimeError, match="proj_inst"): _tiny().load_state_dict(src.state_dict())


def test_guided_label_and_bad_values():
    with pytest.raises(ValueError, match="guided_label"): _tiny(guided_label="true")
    assert _tiny(guided_label="corrected").guided_label == "corrected"
    assert _tiny(T_correct=0.03).T_correct == 0.03


def test_no_instance_ablation_builds_no_key_encoder_and_trains():
    m = PNL.ablation("no_instance", arch="resnet18", num_classes=6, dim=16, queue_size=20, cls_dim=8, proj_hidden=32,
                     inst_head=True)
    assert m.encoder_k is None and not hasattr(m, "queue") and m.encoder_q.proj_inst is None
    out = m(torch.randn(8, 3, 32, 16), None, torch.arange(8) % 6, correct=True)
    assert out["loss_inst"] == 0 and out["loss_proto"] > 0 and out["loss"].requires_grad


def test_collapse_warnings_thresholds():
    import math
    from lupnl.pretrain import collapse_warnings
    ln = math.log(1025)
    assert len(collapse_warnings(dict(loss_inst=ln * 1.019, emb_eff_rank=20.0), 1024)) == 1     # 1.9% above: dead
    assert collapse_warnings(dict(loss_inst=ln * 0.975, emb_eff_rank=20.0), 1024) == []         # 2.5% below: alive
    assert "effective rank" in collapse_warnings(dict(loss_inst=1.0, emb_eff_rank=7.9), 1024)[0]
    assert collapse_warnings(dict(loss_inst=1.0, emb_eff_rank=8.0), 1024) == []
    assert collapse_warnings({}, 1024) == [] and collapse_warnings(dict(loss_inst=0.0), 0) == []
