"""Smoke test of the GPU benchmark `python -m lupnl.bench` at toy size on the CPU (a few seconds), as a user runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_cli_tiny_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "lupnl.bench", "--tiny", "--out", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["device"].startswith("cpu") and res["settings"]["arch"] == "resnet18"
    assert 0 < res["evaluate"]["mAP"] <= 1 and "PNL step:" in p.stdout and "| pnl |" in p.stdout


def test_bench_rejects_a_bad_flag(tmp_path):
    p = subprocess.run([sys.executable, "-m", "lupnl.bench", "--no-such-flag"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr
