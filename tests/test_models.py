"""Tests of lupnl.models that a notebook cannot hold: the prototype update against the reference loop at scale,
a real 2-process gloo DDP run (queue / prototypes / key encoder identical across ranks, shuffle-BN), and checkpoint
I/O in the key layouts of the released LUPerson / LUPerson-NL files and of lupnl's own files."""
import argparse
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

from lupnl.models import (PNL, Encoder, batch_shuffle_ddp, batch_unshuffle_ddp, concat_all_gather, export_backbone,
                          load_pretrained, update_prototypes_, update_prototypes_loop_)

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
