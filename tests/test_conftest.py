"""tests/conftest.py's rule: under CI (`CI` set) a skipped test fails the session unless EXPECTED_SKIPS lists it.
Checked on small throw-away test files run by pytest in a subprocess, with this repository's conftest."""
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

TESTS = '''
import pytest
def test_passes(): pass
def test_skips(): pytest.skip("no such tool here")
@pytest.mark.xfail(reason="known bug")
def test_xfails(): assert False
'''


def _run(pytester, monkeypatch, ci, conftest=CONFTEST, tests=TESTS, name="test_s"):
    if ci is None: monkeypatch.delenv("CI", raising=False)
    else: monkeypatch.setenv("CI", ci)
    pytester.makeconftest(conftest)
    pytester.makepyfile(**{name: tests})
    return pytester.runpytest_subprocess("-p", "no:cacheprovider")


def test_skip_passes_locally(pytester, monkeypatch):
    res = _run(pytester, monkeypatch, ci=None)
    res.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert res.ret == 0


def test_skip_fails_under_ci_and_is_named(pytester, monkeypatch):
    res = _run(pytester, monkeypatch, ci="true")
    res.assert_outcomes(passed=1, skipped=1, xfailed=1)       # the xfail is not a skip
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    out = res.stdout.str()
    assert "skipped under CI" in out and "test_s.py::test_skips: no such tool here" in out
    assert "test_xfails" not in out.split("skipped under CI")[1]


def test_expected_skip_passes_under_ci(pytester, monkeypatch):
    conftest = CONFTEST.replace("EXPECTED_SKIPS = {", 'EXPECTED_SKIPS = {"test_s.py::test_skips": "the tool cannot run here",', 1)
    assert conftest != CONFTEST
    res = _run(pytester, monkeypatch, ci="1", conftest=conftest)
    res.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert res.ret == 0


def test_module_skipped_at_import_fails_under_ci(pytester, monkeypatch):
    res = _run(pytester, monkeypatch, ci="1", tests='import pytest\npytest.importorskip("no_such_module_xyz")\ndef test_a(): pass\n',
               name="test_m")
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    assert "test_m.py: " in res.stdout.str() and "no_such_module_xyz" in res.stdout.str()


def test_a_real_failure_keeps_its_exit_code(pytester, monkeypatch):
    res = _run(pytester, monkeypatch, ci="1", tests=TESTS + "def test_fails(): assert False\n")
    res.assert_outcomes(passed=1, skipped=1, xfailed=1, failed=1)
    assert res.ret == pytest.ExitCode.TESTS_FAILED
