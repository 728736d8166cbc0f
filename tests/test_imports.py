"""The package's import graph, read from the modules' own imports (top-level and inside functions): every import runs
down a floor, so there is no circle, and the jobs on the top floor share machinery only through the floors below."""
import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lupnl"

FLOORS = [                                        # lowest first; a module imports only from floors below its own
    {"runs", "noise"},                            # run machinery, label noise: no lupnl imports
    {"data"},                                     # formats and readers
    {"transforms", "samplers", "toy", "tracks", "explore"},
    {"models"},                                   # trunks and the encoder
    {"pnl", "heads"},                             # the PNL model; the BoT / MGN heads
    {"checkpoints"},                              # every file that holds a model
    {"evaluate"},                                 # features, distances, metrics (and its CLI)
    {"pretrain", "finetune", "bench", "widgets", "clean"},   # the jobs
]
FLOOR = {m: i for i, ms in enumerate(FLOORS) for m in ms}


def lupnl_imports(path):
    "The lupnl modules that the module at `path` imports, anywhere in it: `[(line, module)]`."
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1: names = [node.module] if node.module else [a.name for a in node.names]
            elif node.module == "lupnl": names = [a.name for a in node.names]
            elif node.module and node.module.startswith("lupnl."): names = [node.module.split(".")[1]]
            else: names = []
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] if a.name.startswith("lupnl.") else "__init__" for a in node.names
                     if a.name == "lupnl" or a.name.startswith("lupnl.")]
        else: continue
        found += [(node.lineno, n) for n in names]
    return found


MODULES = sorted(p for p in LIB.glob("*.py") if not p.name.startswith("_"))


def test_every_module_has_a_floor():
    assert {p.stem for p in MODULES} == set(FLOOR), "add the new module to FLOORS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_imports_run_down_a_floor(path):
    up = [f"line {line}: imports {m} (floor {FLOOR.get(m, '?')})" for line, m in lupnl_imports(path)
          if m not in FLOOR or FLOOR[m] >= FLOOR[path.stem]]
    assert not up, f"lupnl/{path.name} (floor {FLOOR[path.stem]}) imports sideways or up: " + "; ".join(up)


def test_the_check_sees_a_circle(tmp_path):
    "The check itself: a module that imports a job, or the package (`import lupnl`), is caught, as is a function-level import."
    bad = tmp_path / "evaluate.py"
    bad.write_text("import torch\ndef f():\n    from lupnl.finetune import build_model\n    import lupnl\n")
    assert lupnl_imports(bad) == [(3, "finetune"), (4, "__init__")]


def test_the_package_imports_its_model_loader_lazily():
    "`lupnl/__init__.py` imports nothing at import time (so `import lupnl` does not load torch); `load_model` on first use."
    tree = ast.parse((LIB / "__init__.py").read_text())
    top = [a.name for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
    assert top == ["os"], top                     # only os, for torch's cache folder (see nbs/index.ipynb)
    assert [m for _, m in lupnl_imports(LIB / "__init__.py")] == ["checkpoints"]


LOAD_EACH = """import json, sys
from lupnl.checkpoints import load_model
kinds = [load_model(p).kind for p in sys.argv[1:]]
print(json.dumps(dict(kinds=kinds, modules=sorted(m for m in sys.modules if m.startswith("lupnl.")))))"""


def test_load_model_needs_no_job(finished, ft_finished, shared_data, tmp_path):
    """`load_model` on every kind of file (pre-training and fine-tuning checkpoints, `backbone.pth`, `.safetensors`, ONNX,
    a released-layout state dict) imports only `checkpoints` and the modules below it: no job, not `evaluate`."""
    import json, subprocess, sys
    import torch
    run = Path(finished.out_dir)
    released = tmp_path / "lup_moco.pth"      # LUPerson's released layout: module.encoder_q.* inside "state_dict"
    trunk = torch.load(run / "backbone.pth", weights_only=True)
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in trunk.items()}}, released)
    files = [run / "checkpoint.pth", Path(ft_finished.out_dir) / "checkpoint.pth", run / "backbone.pth",
             run / "backbone.safetensors", shared_data / "weights" / "osnet_x0_25_msmt17.onnx", released]
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", LOAD_EACH, *map(str, files)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["kinds"] == ["pretrain", "finetune", "weights", "weights", "onnx", "weights"]
    loaded = {m.split(".")[1] for m in out["modules"]}
    assert loaded <= {m for m, f in FLOOR.items() if f <= FLOOR["checkpoints"]}, sorted(loaded)
    assert "checkpoints" in loaded and not loaded & {"evaluate", "pretrain", "finetune", "bench", "widgets"}
