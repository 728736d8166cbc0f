"""lupnl.evaluate against the reference implementations (torchreid 0.2.5, fast-reid 1.4.0, the Market-1501 devkit),
on random matrices with ties / junk / distractors and on real OSNet features; chunking, memory, errors.

torchreid and fast-reid cannot be imported as packages here (torchreid needs cv2, fast-reid pins torch 1.13), so their
pure-python `metrics/rank.py`, `utils/rerank.py`, `metrics/distance.py` and `evaluation/query_expansion.py` are loaded by
path from the installed packages (`pip install torchreid==0.2.5` and `pip install --no-deps fastreid==1.4.0`)."""
import importlib.util, json, os, subprocess, sys, textwrap, time, types, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lupnl import evaluate as ev
from lupnl.evaluate import evaluate_rank, evaluate_features, compute_distance, re_ranking, average_query_expansion, extract_features, plot_retrieval, evaluate, RankResult
from lupnl.checkpoints import OnnxModel

REPO = Path(__file__).resolve().parents[1]


def _load(pkg, rel, name):
    "A module file of an installed package, loaded on its own (its package is not imported)."
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{pkg} is not installed (pip install {'torchreid==0.2.5' if pkg == 'torchreid' else '--no-deps fastreid==1.4.0'})")
    path = Path(spec.submodule_search_locations[0]) / rel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cython evaluation is unavailable": we want the pure-python code
        m = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
        m.__spec__.loader.exec_module(m)
    return m


class _Numpy(types.ModuleType):
    "numpy with `np.bool` back (removed in numpy 1.24, used by torchreid's eval_cuhk03) and, optionally, a stable argsort."
    def __init__(self, stable):
        super().__init__("numpy_shim")
        self.bool = bool
        if stable: self.argsort = lambda a, axis=-1, kind=None: np.argsort(a, axis=axis, kind="stable")
    def __getattr__(self, k): return getattr(np, k)


def _rank_module(pkg, rel, name, stable):
    m = _load(pkg, rel, name)
    m.np = _Numpy(stable)
    return m


@pytest.fixture(scope="module")
def tr():
    "torchreid 0.2.5's rank.py with a stable argsort: its order on ties is then well defined (gallery index)."
    return _rank_module("torchreid", "reid/metrics/rank.py", "tr_rank_stable", stable=True)


@pytest.fixture(scope="module")
def tr_raw():
    "torchreid 0.2.5's rank.py as it is (numpy's default argsort); None when torchreid is not installed."
    if importlib.util.find_spec("torchreid") is None: return None
    return _rank_module("torchreid", "reid/metrics/rank.py", "tr_rank_raw", stable=False)


@pytest.fixture(scope="module")
def fr():
    "fast-reid 1.4.0's rank.py (it also returns the per-query AP and INP), stable argsort; None when not installed (a failure under CI, which installs it)."
    if importlib.util.find_spec("fastreid") is None:
        if os.environ.get("CI"): pytest.fail("fast-reid is not installed under CI: .ci/run installs it (pip install --no-deps fastreid==1.4.0)")
        return None
    return _rank_module("fastreid", "evaluation/rank.py", "fr_rank_stable", stable=True)


def _random_case(seed, ties):
    "A random query x gallery problem with junk (-1) and distractor (0) identities; `ties`: few distinct distances."
    rs = np.random.RandomState(seed)
    Q, G = rs.randint(5, 60), rs.randint(60, 400)
    D = rs.randint(0, rs.choice([3, 10, 100]), (Q, G)) if ties else rs.rand(Q, G)
    D = D.astype(rs.choice([np.float32, np.float64]))
    n_ids = rs.randint(3, 25)
    qp, gp = rs.randint(-1, n_ids, Q), rs.randint(-1, n_ids, G)
    qc, gc = rs.randint(0, 3, Q), rs.randint(0, 3, G)
    gp[: max(1, G // 10)] = 0  # distractors
    return D, qp, gp, qc, gc


def _minp(D, qp, gp, qc, gc):
    "mINP by its definition (Ye et al. 2021, fast-reid): mean over valid queries of #matches / (rank of the last one)."
    inps = []
    for q in range(len(D)):
        order = np.argsort(D[q], kind="stable")
        hit = (gp[order] == qp[q])[~((gp[order] == qp[q]) & (gc[order] == qc[q]))]
        if hit.any(): inps.append(hit.sum() / (np.flatnonzero(hit)[-1] + 1))
    return np.mean(inps)


def _assert_same(r, cmc, mAP, tol=1e-6):
    assert np.abs(np.asarray(cmc, np.float64) - r.cmc[: len(cmc)]).max() <= tol
    assert abs(mAP - r.mAP) <= tol


# ---------------------------------------------------------------------------------------------- exactness, random


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ties", [True, False])
def test_random_vs_torchreid_and_fastreid(tr, fr, seed, ties):
    D, qp, gp, qc, gc = _random_case(seed, ties)
    max_rank = 10  # torchreid fails on galleries shorter than max_rank after the same-camera removal
    try: cmc, mAP = tr.evaluate_rank(D, qp, gp, qc, gc, max_rank, use_cython=False)
    except AssertionError:  # torchreid: no valid query
        with pytest.raises(ValueError, match="no query has a true match"): evaluate_rank(D, qp, gp, qc, gc, max_rank)
        return
    ref_fr = fr.evaluate_rank(D, qp, gp, qc, gc, max_rank, use_cython=False) if fr is not None else None
    minp = _minp(D, qp, gp, qc, gc)
    for chunk in (None, 1, 7):
        for d in (D, torch.from_numpy(D)):
            r = evaluate_rank(d, qp, gp, qc, gc, max_rank, chunk=chunk)
            _assert_same(r, cmc, mAP)
            assert abs(r.mINP - minp) <= 1e-12
            if ref_fr is None: continue  # fast-reid (for mINP and per-query AP) not installed
            fcmc, faps, finps = ref_fr
            _assert_same(r, fcmc, float(np.mean(faps)))
            assert abs(r.mINP - np.mean(finps)) <= 1e-12
            np.testing.assert_allclose(r.query_ap[~np.isnan(r.query_ap)], faps, rtol=0, atol=1e-12)
            assert r.num_valid == len(faps)


@pytest.mark.parametrize("seed", range(6))
def test_untied_matrices_vs_torchreid_as_is(tr_raw, seed):
    "Without ties numpy's default argsort is as good as a stable one: torchreid unmodified gives the same numbers."
    if tr_raw is None: pytest.skip("torchreid is not installed (pip install torchreid==0.2.5)")
    D, qp, gp, qc, gc = _random_case(100 + seed, ties=False)
    cmc, mAP = tr_raw.evaluate_rank(D, qp, gp, qc, gc, 10, use_cython=False)
    _assert_same(evaluate_rank(D, qp, gp, qc, gc, 10), cmc, mAP)


def test_numpy_and_torch_paths_agree():
    "The CPU (numpy) and the CUDA (torch) implementations of the counting step, both run on CPU."
    for seed in range(4):
        D, qp, gp, qc, gc = _random_case(200 + seed, ties=seed % 2 == 0)
        T = torch.from_numpy(D)
        qp_, gp_, qc_, gc_ = (torch.as_tensor(x) for x in (qp, gp, qc, gc))
        members = ev._Members(gp_)
        for junk in (None, gp_ == -1):
            a = ev._rank_true_matches(T, qp_, qc_, gp_, gc_, members, junk, use_numpy=True)
            b = ev._rank_true_matches(T, qp_, qc_, gp_, gc_, members, junk, use_numpy=False)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_float16_and_int_distances(tr):
    D, qp, gp, qc, gc = _random_case(7, ties=True)
    cmc, mAP = tr.evaluate_rank(D.astype(np.float32), qp, gp, qc, gc, 10, use_cython=False)
    _assert_same(evaluate_rank(D.astype(np.int64), qp, gp, qc, gc, 10), cmc, mAP)
    _assert_same(evaluate_rank(torch.from_numpy(D.astype(np.float32)).half(), qp, gp, qc, gc, 10), cmc, mAP)


# ------------------------------------------------------------------------------------ Market devkit average precision


def _devkit(D, qp, gp, qc, gc, junk_pid=-1):
    "Market-1501 devkit (evaluation/compute_AP.m + its caller), transcribed loop by loop; MATLAB's sort is stable."
    aps, cmcs = [], []
    for q in range(len(D)):
        index = np.argsort(D[q], kind="stable")
        good = set(np.flatnonzero((gp == qp[q]) & (gc != qc[q])) .tolist())
        junk = set(np.flatnonzero(((gp == qp[q]) & (gc == qc[q])) | (gp == junk_pid)).tolist())
        if not good or qp[q] == junk_pid: continue  # the devkit has no junk queries
        cmc = np.zeros(len(index)); ngood = len(good)
        old_recall, old_precision, ap, intersect, j, good_now, njunk = 0.0, 1.0, 0.0, 0, 0, 0, 0
        for n, g in enumerate(index):
            flag = g in good
            if flag: cmc[n - njunk:] = 1; good_now += 1
            if g in junk: njunk += 1; continue
            if flag: intersect += 1
            recall, precision = intersect / ngood, intersect / (j + 1)
            ap += (recall - old_recall) * (old_precision + precision) / 2
            old_recall, old_precision = recall, precision
            j += 1
            if good_now == ngood: break
        aps.append(ap); cmcs.append(cmc)
    return (np.mean(aps), np.mean(cmcs, 0)) if aps else (None, None)


@pytest.mark.parametrize("seed", range(8))
def test_market_ap_vs_devkit(seed):
    D, qp, gp, qc, gc = _random_case(300 + seed, ties=seed % 2 == 0)
    mAP, cmc = _devkit(D, qp, gp, qc, gc)
    assert mAP is not None
    r = evaluate_rank(D, qp, gp, qc, gc, max_rank=len(gp), ap="market", junk_pid=-1, chunk=5)
    assert abs(r.mAP - mAP) <= 1e-12
    np.testing.assert_allclose(r.cmc, cmc, rtol=0, atol=1e-12)
    assert r.mAP <= evaluate_rank(D, qp, gp, qc, gc, ap="standard", junk_pid=-1).mAP  # precision before a match <= at it


# --------------------------------------------------------------------------------------------- CUHK03 protocol


@pytest.mark.parametrize("seed", range(4))
def test_cuhk03_protocol_vs_torchreid(tr, seed):
    "Same seed, same draws: torchreid's eval_cuhk03 after np.random.seed(s) == ours with seed=s."
    rs = np.random.RandomState(400 + seed)
    Q, G, n_ids = 40, 400, 60
    D = (rs.randint(0, 20, (Q, G)) if seed % 2 else rs.rand(Q, G)).astype(np.float32)
    qp, gp, qc, gc = rs.randint(0, n_ids, Q), rs.randint(0, n_ids, G), rs.randint(0, 2, Q), rs.randint(0, 2, G)
    for max_rank in (10, 50):
        np.random.seed(seed)
        cmc, mAP = tr.evaluate_rank(D, qp, gp, qc, gc, max_rank, use_metric_cuhk03=True, use_cython=False)
        r = evaluate_rank(D, qp, gp, qc, gc, max_rank, cuhk03=True, seed=seed, chunk=9)
        _assert_same(r, cmc, mAP)  # torchreid accumulates in float32: differences of ~1e-7
    other = evaluate_rank(D, qp, gp, qc, gc, 50, cuhk03=True, seed=seed + 1)
    assert not np.array_equal(other.cmc, r.cmc) and other.mAP == r.mAP  # the seed changes the draws, not the AP


# ----------------------------------------------------------------------------------- distances, re-ranking, AQE


def test_compute_distance_vs_torchreid():
    dist = _load("torchreid", "reid/metrics/distance.py", "tr_distance")
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(33, 64, generator=g), torch.randn(150, 64, generator=g)
    for metric in ("euclidean", "cosine"):
        ref = dist.compute_distance_matrix(qf, gf, metric)
        torch.testing.assert_close(compute_distance(qf, gf, metric, chunk=5), ref, rtol=0, atol=2e-5)


def test_evaluate_features_equals_evaluate_rank():
    g = torch.Generator().manual_seed(1)
    qp, gp = torch.arange(90) % 30, torch.arange(600) % 30
    qc, gc = torch.arange(90) % 4, torch.arange(600) % 5
    qf = F.one_hot(qp, 30).float() + 0.3 * torch.randn(90, 30, generator=g)
    gf = F.one_hot(gp, 30).float() + 0.3 * torch.randn(600, 30, generator=g)
    for metric in ("cosine", "euclidean"):
        for chunk in (3, 13, None):  # the same chunk, the same BLAS calls, the same distances
            ref = evaluate_rank(compute_distance(qf, gf, metric, chunk=chunk), qp, gp, qc, gc, chunk=5)
            r = evaluate_features(qf, gf, qp, gp, qc, gc, metric=metric, chunk=chunk)
            assert np.array_equal(r.cmc, ref.cmc) and r.mAP == ref.mAP and r.mINP == ref.mINP


@pytest.mark.parametrize("shape,k1,k2,lam", [((20, 100, 16), 20, 6, 0.3), ((50, 300, 32), 20, 6, 0.3),
                                            ((7, 40, 8), 5, 1, 0.5), ((30, 200, 8), 10, 3, 0.0)])
def test_re_ranking_vs_torchreid(shape, k1, k2, lam):
    rr = _load("torchreid", "reid/utils/rerank.py", "tr_rerank")
    Q, G, d = shape
    g = torch.Generator().manual_seed(Q)
    qf, gf = torch.randn(Q, d, generator=g), torch.randn(G, d, generator=g)
    qg, qq, gg = (torch.cdist(a, b).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    ref = rr.re_ranking(qg, qq, gg, k1, k2, lam)
    ours = re_ranking(qg, qq, gg, k1, k2, lam, chunk=64).numpy()
    assert np.abs(ours - ref).max() <= 1e-6


def test_average_query_expansion_vs_fastreid():
    qe = _load("fastreid", "evaluation/query_expansion.py", "fr_qe")
    g = torch.Generator().manual_seed(2)
    qf, gf = torch.randn(30, 16, generator=g), torch.randn(200, 16, generator=g)
    for k, alpha, times in [(10, 3.0, 1), (5, 0.0, 2), (1, 1.0, 1)]:
        a = qe.aqe(qf, gf, times, k, alpha)
        b = average_query_expansion(qf, gf, k, alpha, times, chunk=17)
        for x, y in zip(a, b): torch.testing.assert_close(y, x.float(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- features


def test_extract_features_flip_normalize_and_mode():
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(9, 3, 8, 4, generator=g)
    ds = torch.utils.data.TensorDataset(imgs, torch.arange(9), torch.arange(9) % 2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Flatten()).train()
    f, p, c = extract_features(model, torch.utils.data.DataLoader(ds, batch_size=4), flip=True, normalize=False, progress=False)
    assert model.training  # restored
    model.eval()
    with torch.no_grad(): ref = (model(imgs) + model(imgs.flip(3))) / 2
    torch.testing.assert_close(f, ref)
    f2, _, _ = extract_features(model, torch.utils.data.DataLoader(ds, batch_size=5), progress=False)
    torch.testing.assert_close(f2, F.normalize(model(imgs).detach(), dim=1))
    assert p.tolist() == list(range(9)) and c.dtype == torch.int64
    with pytest.raises(ValueError, match="empty loader"): extract_features(model, [], progress=False)


# ---------------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="session")
def osnet(shared_data):
    pytest.importorskip("onnxruntime")
    return OnnxModel(shared_data / "weights/osnet_x0_25_msmt17.onnx")


def _real_features(model, bench):
    from lupnl.data import ImageDataset
    from lupnl.transforms import reid_test_transform
    out = []
    for items in (bench.query, bench.gallery):
        dl = torch.utils.data.DataLoader(ImageDataset(items, reid_test_transform((256, 128))), batch_size=64)
        out.append(extract_features(model, dl, progress=False))
    return out


def test_real_market_mini(shared_data, osnet, tr_raw):
    "OSNet-x0.25 (MSMT17) on the real Market-1501 mini set: the data README's rank-1 0.70 / mAP 0.76, and torchreid's numbers."
    from lupnl.data import read_market1501
    bench = read_market1501(shared_data / "market1501-pepper-mini")
    (qf, qp, qc), (gf, gp, gc) = _real_features(osnet, bench)
    D = compute_distance(qf, gf, "cosine")
    r = evaluate_rank(D, qp, gp, qc, gc, max_rank=10)
    if tr_raw is not None:
        cmc, mAP = tr_raw.evaluate_rank(D.numpy(), qp.numpy(), gp.numpy(), qc.numpy(), gc.numpy(), 10, use_cython=False)
        _assert_same(r, cmc, mAP)
    assert r.num_valid == 30  # two queries have only same-camera gallery images
    assert abs(r.cmc[0] - 0.70) < 0.005 and abs(r.mAP - 0.76) < 0.005
    assert evaluate_features(qf, gf, qp, gp, qc, gc, max_rank=10).mAP == r.mAP


@pytest.mark.slow
def test_real_cuhk03_pairs(shared_data, osnet, tr_raw):
    "OSNet on the real CUHK03 pair-1 val split (451 vs 487): README's rank-1 0.53 / mAP 0.52; torchreid's numbers, both protocols."
    from lupnl.data import read_cuhk03_pairs
    bench = read_cuhk03_pairs(shared_data / "cuhk03-labeled-pair1")
    (qf, qp, qc), (gf, gp, gc) = _real_features(osnet, bench)
    assert (len(qp), len(gp), len(set(gp.tolist()))) == (451, 487, 100)
    D = compute_distance(qf, gf, "cosine")
    r = evaluate_rank(D, qp, gp, qc, gc)
    assert abs(r.cmc[0] - 0.53) < 0.01 and abs(r.mAP - 0.52) < 0.01
    if tr_raw is None: pytest.skip("torchreid is not installed: README numbers checked, torchreid comparison skipped")
    Dn, qpn, gpn, qcn, gcn = D.numpy(), qp.numpy(), gp.numpy(), qc.numpy(), gc.numpy()
    cmc, mAP = tr_raw.evaluate_rank(Dn, qpn, gpn, qcn, gcn, 50, use_cython=False)
    _assert_same(r, cmc, mAP)
    n = 150  # torchreid's pure-python CUHK03 protocol is slow: the first 150 queries
    tr = _rank_module("torchreid", "reid/metrics/rank.py", "tr_rank_stable2", stable=True)  # a few distances tie
    np.random.seed(5)
    cmc3, mAP3 = tr.evaluate_rank(Dn[:n], qpn[:n], gpn, qcn[:n], gcn, 50, use_metric_cuhk03=True, use_cython=False)
    _assert_same(evaluate_rank(D[:n], qp[:n], gp, qc[:n], gc, cuhk03=True, seed=5), cmc3, mAP3)


# ------------------------------------------------------------------------------------------ memory, errors, misc


_MEM_SCRIPT = """
import json, sys, time, torch, numpy as np
torch.set_num_threads(2)
from lupnl.evaluate import evaluate_features
Q, G, dim, n_ids = {Q}, {G}, {dim}, {n_ids}
g = torch.Generator().manual_seed(0)
qf, gf = torch.randn(Q, dim, generator=g), torch.randn(G, dim, generator=g)
qp, gp = torch.randint(0, n_ids, (Q,), generator=g), torch.randint(0, n_ids, (G,), generator=g)
qc, gc = torch.randint(0, 15, (Q,), generator=g), torch.randint(0, 15, (G,), generator=g)
def peak_mb():  # VmHWM, not ru_maxrss: a child inherits its parent's ru_maxrss across fork + exec
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
before = peak_mb()
t = time.time()
r = evaluate_features(qf, gf, qp, gp, qc, gc, progress=False)
print(json.dumps(dict(before_mb=before, peak_mb=peak_mb(),
                      seconds=time.time() - t, mAP=r.mAP, num_valid=r.num_valid)))
"""


def _measure(Q, G, dim, n_ids):
    "Peak RSS of `evaluate_features` on random features, in a fresh process."
    code = textwrap.dedent(_MEM_SCRIPT.format(Q=Q, G=G, dim=dim, n_ids=n_ids))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_is_bounded_by_the_chunk():
    "3,000 x 40,000 random features (a 458 MB distance matrix): ranking from features never holds the matrix."
    m = _measure(3000, 40000, 32, 2000)
    full_mb = 3000 * 40000 * 4 / 2**20
    print(m)
    assert m["peak_mb"] - m["before_mb"] < 0.5 * full_mb


@pytest.mark.slow
def test_memory_msmt17_scale():
    "MSMT17 test-set size (11,659 queries x 82,161 gallery, 3,060 ids), random 512-d features: peak RSS <= 4 GB."
    m = _measure(11659, 82161, 512, 3060)
    print(m)
    assert m["peak_mb"] < 4096


def test_errors():
    D = np.random.rand(3, 5).astype(np.float32)
    p, c = np.array([1, 2, 3]), np.array([0, 0, 0])
    gp, gc = np.array([1, 2, 3, 1, 2]), np.array([1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="q_camids has 2 entries"): evaluate_rank(D, p, gp, c[:2], gc)
    with pytest.raises(ValueError, match="2-D"): evaluate_rank(D[0], p, gp, c, gc)
    with pytest.raises(ValueError, match="no query has a true match"): evaluate_rank(D, p + 10, gp, c, gc)
    Dn = D.copy(); Dn[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"): evaluate_rank(Dn, p, gp, c, gc)
    Dn = D.copy(); Dn[0, 1] = np.nan  # NaN elsewhere ranks last, like numpy's argsort
    assert evaluate_rank(Dn, p, gp, c, gc).num_valid == 3
    with pytest.raises(ValueError, match="metric"): compute_distance(torch.ones(2, 3), torch.ones(4, 3), "hamming")
    with pytest.raises(ValueError, match="same dim"): compute_distance(torch.ones(2, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="q_q_dist"): re_ranking(D, D, np.zeros((5, 5)))
    with pytest.raises(FileNotFoundError, match="ONNX model not found"): OnnxModel("/nonexistent/model.onnx")
    with pytest.raises(TypeError, match="Benchmark"): evaluate(torch.nn.Identity(), object())


def test_plot_retrieval_and_evaluate(tmp_path):
    "Figure content (marks, AP in the title) and `evaluate` on item lists, on a few generated images."
    import matplotlib
    matplotlib.use("Agg")
    from PIL import Image
    from lupnl.data import Item
    rs = np.random.RandomState(0)
    colours = rs.randint(0, 255, (4, 3))
    def item(i, pid, cam):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((16, 8, 3), colours[pid], np.uint8)).save(p)
        return Item(str(p), pid, cam)
    query = [item(0, 1, 0), item(1, 2, 0)]
    gallery = [item(10 + j, pid, cam) for j, (pid, cam) in enumerate([(1, 0), (1, 1), (2, 1), (3, 1), (2, 0)])]
    D = torch.tensor([[0.1, 0.3, 0.2, 0.5, 0.4], [0.6, 0.5, 0.1, 0.2, 0.05]])
    fig = plot_retrieval(query, gallery, D, [0, 1], topk=4)
    axes = np.array(fig.axes).reshape(2, 5)
    assert "AP 0.50" in axes[0, 0].get_title()  # true match (index 1) behind index 2
    assert [axes[0, j].spines["top"].get_edgecolor()[:3] for j in (1, 2, 3)] == [
        matplotlib.colors.to_rgb(x) for x in ("0.6", "tab:red", "tab:green")]
    scores = evaluate(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), query, gallery,
                      size=(16, 8), progress=False, max_rank=3)
    assert scores["num_valid"] == 2 and 0 <= scores["mAP"] <= 100


def test_rank_result_repr_and_dict():
    D = torch.tensor([[0.15, 0.1, 0.2, 0.5, 0.9, 0.5]])
    r = evaluate_rank(D, [1], [2, 1, 1, 3, 4, 1], [0], [1, 0, 1, 1, 1, 2], max_rank=5)
    assert isinstance(r, RankResult) and "mAP=0.5000" in repr(r)
    assert r.as_dict(percent=True) == {"mAP": 50.0, "rank1": 0.0, "rank5": 100.0, "mINP": 50.0, "num_valid": 1}


# ------------------------------------------------------------------------------------------ papermill


def _images_state():
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (REPO / "images").iterdir()}


@pytest.mark.slow
def test_papermill_defaults(tmp_path):
    "The evaluation chapter runs headless with its defaults on the built-in data and writes nothing into images/."
    before = _images_state()
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "papermill", "nbs/05_evaluate.ipynb", str(tmp_path / "out.ipynb"),
                          "--log-level", "WARNING"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "MPLBACKEND": "Agg", "OMP_WAIT_POLICY": "PASSIVE"})
    minutes = (time.time() - t0) / 60
    assert res.returncode == 0, res.stderr[-3000:]
    print(f"papermill 05_evaluate with defaults: {minutes:.2f} min")
    cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["metadata"]["papermill"]["status"] == "completed" for c in code)
    real = [c for c in code if "if run_real" in "".join(c["source"])]
    assert real and not any(c["outputs"] for c in real), "the real-data cells ran without run_real"
    assert _images_state() == before


@pytest.mark.slow
def test_papermill_parameters(tmp_path, shared_data):
    """`-p run_real True` runs the real-data cells (not overwritten by a later cell), `-p out_dir` gets the figure, and
    with LUPNL_IMAGES=1 (what images/make.sh sets) so does the checkout's images/ (here a stand-in checkout, the
    kernel's working directory); a misspelt -p fails."""
    before = _images_state()
    fake = tmp_path / "checkout"                        # what lupnl.runs.repo_root() recognises: settings.ini + lupnl/
    (fake / "lupnl").mkdir(parents=True); (fake / "lupnl" / "__init__.py").write_text(""); (fake / "settings.ini").write_text("")
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "LUPNL_IMAGES": "1"}
    res = subprocess.run([sys.executable, "-m", "papermill", "nbs/05_evaluate.ipynb", str(tmp_path / "out.ipynb"),
                          "-p", "run_real", "True", "-p", "data", str(shared_data), "-p", "out_dir", str(tmp_path / "figs"),
                          "--cwd", str(fake), "--log-level", "WARNING"], cwd=REPO, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
    printed = "".join(o.get("text", "") if isinstance(o.get("text"), str) else "".join(o.get("text", []))
                      for c in cells if c["cell_type"] == "code" and "if run_real" in "".join(c["source"]) for o in c["outputs"])
    assert "'mAP': 75.9" in printed and "'mAP': 52.3" in printed, printed[:2000]
    assert (tmp_path / "figs" / "retrieval_toy.png").stat().st_size > 10_000
    assert (fake / "images" / "retrieval_toy.png").read_bytes() == (tmp_path / "figs" / "retrieval_toy.png").read_bytes()
    assert _images_state() == before
    bad = subprocess.run([sys.executable, "-m", "papermill", "nbs/05_evaluate.ipynb", str(tmp_path / "bad.ipynb"),
                          "-p", "run_rael", "True", "--log-level", "WARNING"], cwd=REPO, capture_output=True, text=True,
                         env={k: v for k, v in env.items() if k != "LUPNL_IMAGES"})
    assert bad.returncode != 0 and "did you mean 'run_real'" in bad.stderr + bad.stdout


# ------------------------------------------------------------------------------- no silent wrong results (issue 23)

def _labels():
    return torch.arange(40) % 10, torch.arange(120) % 10, torch.arange(40) % 3, torch.arange(120) % 4


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_non_finite_features_are_refused(metric):
    qp, gp, qc, gc = _labels()
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(40, 8, generator=g), torch.randn(120, 8, generator=g)
    qf[[2, 5, 9], 1] = float("nan"); gf[7, 0] = float("inf")
    msg = "3 of 40 query features and 1 of 120 gallery features are not finite"
    with pytest.raises(ValueError, match=msg): evaluate_features(qf, gf, qp, gp, qc, gc, metric=metric)
    with pytest.raises(ValueError, match=msg): compute_distance(qf, gf, metric)


def test_constant_features_are_warned_about():
    "An all-zero model (and any nearly constant one) is warned about; ordinary features, however alike, are not."
    qp, gp, qc, gc = _labels()
    with pytest.warns(UserWarning, match=r"the query and gallery features are \(nearly\) constant"):
        r = evaluate_features(torch.zeros(40, 16), torch.zeros(120, 16), qp, gp, qc, gc)
    assert r.num_valid == 40                              # still scored (ties), but not silently
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 16, generator=g)
    with pytest.warns(UserWarning, match=r"the gallery features are \(nearly\) constant"):
        compute_distance(torch.randn(40, 16, generator=g), base + 1e-6 * torch.randn(120, 16, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # alike but rankable (spread 1e-2): no warning
        evaluate_features(base + 1e-2 * torch.randn(40, 16, generator=g), base + 1e-2 * torch.randn(120, 16, generator=g),
                          qp, gp, qc, gc)
        evaluate_features(torch.randn(1, 16, generator=g), torch.randn(120, 16, generator=g), qp[:1], gp, qc[:1], gc)


def test_all_zero_model_through_evaluate(tmp_path):
    from PIL import Image
    from lupnl.data import Item
    def item(i, pid, cam):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((16, 8, 3), 40 * pid, np.uint8)).save(p)
        return Item(str(p), pid, cam)
    query, gallery = [item(0, 1, 0), item(1, 2, 0)], [item(10 + j, pid, 1) for j, pid in enumerate([1, 2, 3])]
    zero = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 8))
    torch.nn.init.zeros_(zero[2].weight); torch.nn.init.zeros_(zero[2].bias)
    with pytest.warns(UserWarning, match="constant"): evaluate(zero, query, gallery, size=(16, 8), progress=False)


# ---- the command line: the protocol recorded, user errors in one line

def cli(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return subprocess.run([sys.executable, "-m", "lupnl.evaluate", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(res, *texts):
    err = res.stderr.strip()
    assert res.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, res.stderr[-3000:]
    assert err.startswith("python -m lupnl.evaluate: error: ") and all(t in err for t in texts), err
    return err


@pytest.fixture(scope="module")
def market_test_only(shared_data, tmp_path_factory):
    "The Market mini query and gallery, without bounding_box_train (copied: 64 small images)."
    import shutil
    root = tmp_path_factory.mktemp("bench") / "market_test_only"
    for s in ("query", "bounding_box_test"): shutil.copytree(shared_data / "market1501-pepper-mini" / s, root / s)
    return root


def test_main_records_the_protocol_and_needs_no_training_split(shared_data, market_test_only, capsys):
    pytest.importorskip("onnxruntime")
    onnx = shared_data / "weights" / "osnet_x0_25_msmt17.onnx"
    r = ev.main([str(onnx), "--data", str(market_test_only), "--json", "--device", "cpu", "--ap", "market", "--cuhk03"])
    assert json.loads(capsys.readouterr().out) == r
    assert (r["ap"], r["cuhk03"], r["flip"], r["metric"]) == ("market", True, False, "cosine")
    assert r["benchmark"] == "market1501" and r["num_query"] == 32 and r["num_valid"] == 30
    r = ev.main([str(onnx), "--data", str(market_test_only), "--device", "cpu"])
    assert (r["ap"], r["cuhk03"]) == ("standard", False) and abs(r["mAP"] - 75.93) <= 0.05   # the README's number
    head = ev.format_scores({**r, "ap": "market", "cuhk03": True}).splitlines()[0]
    assert head.endswith("(onnx, 256x128 crops, market AP, CUHK03 single-shot CMC, cosine)"), head
    assert "market AP" not in ev.format_scores(r) and "CUHK03" not in ev.format_scores(r)


def test_cli_user_errors_are_one_line(shared_data, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = shared_data / "weights" / "osnet_x0_25_msmt17.onnx"
    _one_line_error(cli(onnx, "--data", tmp_path, "--device", "cpu"), "unknown benchmark layout", str(tmp_path))   # a DataError
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx model")
    _one_line_error(cli(tmp_path / "junk.onnx", "--device", "cpu"), "junk.onnx: onnxruntime: ", "INVALID_PROTOBUF")
    # the ONNX model's fixed 256x128 input: refused before any data is read (the benchmark here does not even exist)
    _one_line_error(cli(onnx, "--size", "128x64", "--data", tmp_path / "nowhere", "--device", "cpu"),
                    "--size 128x64 does not fit the ONNX model", "fixed at 256x128")
    _one_line_error(cli(onnx, "--data", tmp_path / "nowhere", "--device", "cpu"), "benchmark root not found")
    _one_line_error(cli(onnx, "--device", "cpu7"), "--device cpu7")


def test_unreadable_query_and_gallery_images_are_left_out_not_replaced(tmp_path):
    """A garbage gallery image and an oversized query image (read by 2 DataLoader workers): left out of the evaluation,
    which then scores exactly what the benchmark without them scores, and counted. Before: `CorruptImageError`."""
    from PIL import Image
    from lupnl.data import Item
    rng = np.random.default_rng(0)
    def item(name, pid, cam):
        p = tmp_path / f"{name}.png"
        Image.fromarray((40 * pid + rng.integers(0, 60, (16, 8, 3))).astype(np.uint8)).save(p)
        return Item(str(p), pid, cam)
    query = [item(f"q{pid}", pid, 0) for pid in range(5)]
    gallery = [item(f"g{pid}_{k}", pid, 1) for pid in range(5) for k in range(3)]
    (tmp_path / "g2_1.png").write_bytes(b"garbage")
    Image.new("RGB", (5000, 4)).save(tmp_path / "q3.png")
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d((4, 2)), torch.nn.Flatten())
    with pytest.warns(UserWarning, match="unreadable image"):
        r = evaluate(model, query, gallery, size=(16, 8), num_workers=2, progress=False)
    kept = lambda items: [i for i in items if Path(i.path).name not in ("g2_1.png", "q3.png")]
    assert r == {**evaluate(model, kept(query), kept(gallery), size=(16, 8), progress=False), "skipped_eval_images": 2}
