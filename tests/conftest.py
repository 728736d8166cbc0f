"""Shared pytest fixtures: where the real data lives, and the built-in toy dataset."""
import os, shutil
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    return Path(os.environ.get("LUPNL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    "The real research data in ../shared/data. Missing: skipped locally, a failure under CI."
    p = _shared_data()
    if not p.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real data expected at {p} under CI but it is missing")
        pytest.skip(f"real data not found at {p} (set LUPNL_SHARED_DATA)")
    return p


# ---- the tiny pre-training data shared by test_pretrain.py and test_bad_input.py
# Every session uses its own data folder, so the papermill run of test_pretrain.py generates the built-in data
# (its time limit includes that). OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin-wait slow torch down
# tenfold when the 2 cores are shared with other processes; it changes nothing on an idle machine.

@pytest.fixture(scope="session")
def data_home(tmp_path_factory):
    "LUPNL_DATA for the runs of this session: a fresh folder (the first run generates the toy data in it)."
    return tmp_path_factory.mktemp("lupnl_data")


@pytest.fixture(scope="session")
def env(data_home):
    return dict(os.environ, LUPNL_DATA=str(data_home), OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1",
                MPLBACKEND="Agg")


@pytest.fixture(scope="session")
def tiny_lmdb(data_home, tmp_path_factory):
    "The first 128 crops of the toy data (about 9 identities) as their own LUPerson-NL LMDB (noisy pids, true_pids, noise_kinds)."
    from lupnl.data import LMDBDataset, write_lmdb
    from lupnl.toy import toy_dataset
    toy = toy_dataset(data_home / "toy", progress=False)
    ds = LMDBDataset(toy.lmdb)
    n = 128
    out = tmp_path_factory.mktemp("tiny") / "lmdb"
    write_lmdb(out, ((ds.read_bytes(i), int(ds.labels[i])) for i in range(n)), progress=False,
               extra={"true_pids": list(ds.meta["true_pids"][:n]), "noise_kinds": list(ds.meta["noise_kinds"][:n])})
    return out


@pytest.fixture(scope="session")
def tiny_bench(data_home, tmp_path_factory):
    "The built-in benchmark cut to 12 test identities (their queries and gallery images) and a few train images."
    from lupnl.toy import toy_dataset
    bench = toy_dataset(data_home / "toy", progress=False).bench
    out = tmp_path_factory.mktemp("tiny_bench")
    pids = sorted({f.name.split("_")[0] for f in (bench / "query").glob("*.jpg")})[:12]
    for sub, keep in (("query", pids), ("bounding_box_test", pids), ("bounding_box_train", None)):
        files = sorted((bench / sub).glob("*.jpg"))
        files = [f for f in files if f.name.split("_")[0] in keep] if keep else files[:20]
        (out / sub).mkdir()
        for f in files: shutil.copy(f, out / sub / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_config():
    "`make(data, bench, out_dir, epochs, **kwargs)`: a PretrainConfig of seconds per epoch on `tiny_lmdb` / `tiny_bench`."
    from lupnl.pretrain import PretrainConfig
    def make(data, bench, out_dir, epochs, **kwargs):
        """32x16 crops, global batch 16, correction and label guidance from epoch 1, evaluation at the end only; the schedule
        and the prototype momentum given, so that a resume may extend the epochs."""
        return PretrainConfig(**{**dict(data=str(data), bench=str(bench), out_dir=str(out_dir), epochs=epochs, batch_size=16,
                                        img_size=(32, 16), lr=0.03, lr_steps=(), queue_size=64, correct_start=1,
                                        label_guided_start=1, eval_every=0, proto_momentum=0.9), **kwargs})
    return make


# ---- finished tiny runs shared by every test file that needs one (test_pretrain, test_finetune, test_bad_input).
# Session-scoped: each is trained once per pytest session. A test only reads them; one that changes its run (resume,
# extra files) copies the out_dir to its tmp_path first (shutil.copytree, a few MB).

@pytest.fixture(scope="session")
def finished(tiny_lmdb, tiny_bench, tmp_path_factory, tiny_config):
    "A finished 1-epoch pre-training run of `tiny_config` (its config; the run is in its out_dir). Read only: copy to change."
    from lupnl.pretrain import train
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = tiny_config(tiny_lmdb, tiny_bench, out, 1)
    train(cfg)
    return cfg


FT_TINY = dict(id_ratio=0.3, P=4, K=4, img_size=(64, 32), eval_every=0, workers=0, epochs=1)


@pytest.fixture(scope="session")
def ft_finished(tmp_path_factory):
    "A finished 1-epoch BoT fine-tuning run (`FT_TINY`) on the built-in benchmark (its config). Read only: copy to change."
    import lupnl.finetune as ft
    cfg = ft.FinetuneConfig(**FT_TINY, out_dir=str(tmp_path_factory.mktemp("ft") / "bot"))
    ft.train(cfg)
    return cfg


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of more than ~10 s (papermill, DDP, browser, real-data end to end); "
                                       "`pytest -m 'not slow' tests` is the quick tier, .ci/run runs everything")


# ---- a skip under CI is a failure, unless it is expected
# Locally a test may skip for a missing optional tool or data set. Under CI (`CI` set in the environment, as .ci/run's
# caller does) everything is installed and staged, so a skip means a check silently did not run: the session fails,
# naming it, unless its node id is listed here with the reason it is expected to skip.
EXPECTED_SKIPS = {
    # "tests/test_x.py::test_y": "why this check cannot run under CI",
}

_skipped = {}


def _record_skip(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        _skipped.setdefault(report.nodeid, reason)


def pytest_runtest_logreport(report):
    _record_skip(report)


def pytest_collectreport(report):
    _record_skip(report)   # a whole module skipped at import (pytest.importorskip at the top)


def unexpected_skips(skipped, expected=EXPECTED_SKIPS):
    "The skipped node ids (-> reason) that `expected` does not list."
    return {k: v for k, v in skipped.items() if k not in expected}


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get("CI"): return
    bad = unexpected_skips(_skipped)
    if bad:
        session.config._lupnl_bad_skips = bad
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = getattr(config, "_lupnl_bad_skips", None)
    if bad:
        terminalreporter.section("skipped under CI (a failure: list it in tests/conftest.py EXPECTED_SKIPS if expected)", red=True)
        for nodeid, reason in bad.items(): terminalreporter.line(f"{nodeid}: {reason}", red=True)


# runs `python -m MODULE --help` in this process, then says whether torch got imported (it must not be, for --help)
HELP_WITHOUT_TORCH = """import runpy, sys
mod = sys.argv[1]; sys.argv = [mod, "--help"]
try: runpy.run_module(mod, run_name="__main__")
except SystemExit: pass
print("torch imported:", "torch" in sys.modules)"""
