"""The committed notebooks are the documentation: each carries the outputs of its default run and is nbdev-clean."""
import json
from pathlib import Path

import pytest
from execnb.nbio import read_nb, nb2str
from nbdev.clean import clean_nb
from nbdev.config import get_config

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "nbs").glob("*.ipynb"))


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 8, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_outputs(path):
    "Every notebook is committed with the outputs of its default run (printed results, tables, figures), and none is an error."
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells, f"{path.name}: no code cells"
    outputs = [o for c in cells for o in c.get("outputs", [])]
    shown = [c for c in cells if c.get("outputs")]
    assert shown, (f"{path.name}: none of its {len(cells)} code cells shows output; "
                   "run it (README, 'Working on lupnl') and commit the result")
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: committed with an error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    "`nbdev_clean` would change nothing (no execution metadata, stable cell ids, tags kept)."
    cfg = get_config(path=REPO)
    nb = read_nb(path)
    clean_nb(nb, cfg.clear_all, cfg.get("allowed_metadata_keys").split(),
             cfg.get("allowed_cell_metadata_keys").split(), cfg.clean_ids)
    assert nb2str(nb) == path.read_text(encoding="utf-8"), f"{path.name} is not clean: run nbdev_clean --fname {path}"


# ---- one way to find the repository, save a figure and gate a slow cell (lupnl.runs: repo_root, save_figure, run_slow)
OLD_WAYS = {"write_images": "a write_images parameter (use lupnl.runs.save_figure; images/make.sh sets LUPNL_IMAGES=1)",
            "LUPNL_FIGURES": "LUPNL_FIGURES (now LUPNL_IMAGES, read by lupnl.runs.save_figure only)",
            "get_config().config_path": "nbdev's config path as the repository root (use lupnl.runs.repo_root)",
            'os.environ.get("IN_TEST") == "1"': "an ad-hoc slow gate (use lupnl.runs.run_slow)",
            '/ "images" /': "a figure written into images/ by hand (use lupnl.runs.save_figure)"}
NOT_CONVERTED_YET = set()   # notebooks still to be converted (none)
DEFINES_THEM = "02a_runs.ipynb"                                     # lupnl.runs: the helpers and their tests


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in NOT_CONVERTED_YET | {DEFINES_THEM}], ids=lambda p: p.name)
def test_notebook_uses_the_shared_helpers(path):
    "Repository root, figures into images/ and slow gates go through lupnl.runs, nowhere else."
    code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    found = [why for old, why in OLD_WAYS.items() if old in code]
    assert not found, f"{path.name}: {'; '.join(found)}"


def test_figures_command_runs_existing_notebooks_with_lupnl_images():
    "images/make.sh names only notebooks that exist, and asks for the README's figures only through LUPNL_IMAGES=1."
    import re
    text = (REPO / "images" / "make.sh").read_text()
    names = set(re.findall(r"nbs/(\w+)\.ipynb", text))
    for m in re.finditer(r"for nb in ([\w ]+); do", text): names |= set(m.group(1).split())
    assert names and {"00a_toy", "01_explore", "04_finetune", "05_evaluate"} <= names, names
    missing = sorted(n for n in names if not (REPO / "nbs" / f"{n}.ipynb").is_file())
    assert not missing, f"images/make.sh runs notebooks that do not exist: {missing}"
    assert "export LUPNL_IMAGES=1" in text
    assert "write_images" not in text and "LUPNL_FIGURES" not in text


# ---- each notebook runs once per CI: nbdev_test skips the ones pytest runs through papermill (and checks)
def _readme_test_command():
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- test-command -->", 1)[1].split("<!-- /test-command -->", 1)[0]
    return " ".join(l for l in block.splitlines() if l.strip() and not l.startswith("```"))


def _nbdev_test_notebooks(cmd):
    "The notebooks (names) that the `nbdev_test` of `cmd` executes: all of nbs/ but its --skip_file_re (default ^[_.])."
    import re, shlex
    args = shlex.split(cmd.split("&&")[0])
    assert args and args[0].endswith("nbdev_test"), f"the README test command does not start with nbdev_test: {cmd}"
    skip = args[args.index("--skip_file_re") + 1] if "--skip_file_re" in args else "^[_.]"
    return {p.name for p in NOTEBOOKS if not re.search(skip, p.name)}


def _papermill_notebooks():
    "Notebooks that tests/ execute with `python -m papermill` (given as \"nbs/X.ipynb\" or as `str(NB)`)."
    import re
    names = set()
    for f in (REPO / "tests").glob("test_*.py"):
        text = f.read_text()
        nb_const = re.search(r'^NB = REPO / "nbs" / "([\w.]+\.ipynb)"', text, re.M)
        for arg in re.findall(r'"-m", "papermill", ([^,]+),', text):
            if (m := re.fullmatch(r'"nbs/([\w.]+\.ipynb)"', arg.strip())): names.add(m.group(1))
            elif arg.strip() == "str(NB)" and nb_const: names.add(nb_const.group(1))
    return names


def test_each_notebook_runs_once_per_ci():
    pm = _papermill_notebooks()
    assert {"04_finetune.ipynb", "05_evaluate.ipynb"} <= pm, pm
    nb = _nbdev_test_notebooks(_readme_test_command())
    assert not nb & pm, f"run twice, by nbdev_test and by papermill in tests/: {sorted(nb & pm)}"
    never = {p.name for p in NOTEBOOKS} - nb - pm
    assert not never, f"never executed: {sorted(never)}"


# ---- papermill reads every line of a parameters cell (issue 22: `lr: ... # ... = 0.0167 ...` was skipped)
def _parameters_cell(path):
    return next((c for c in json.loads(path.read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])), None)


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if _parameters_cell(p)], ids=lambda p: p.name)
def test_papermill_parses_every_parameter(path, caplog):
    "papermill's parser (`--help-notebook`, `-p` name checks) finds every parameter of the cell, and warns about no line."
    import logging
    from typing import Optional
    from papermill.translators import PythonTranslator
    src = "".join(_parameters_cell(path)["source"])
    with caplog.at_level(logging.WARNING):
        names = [p.name for p in PythonTranslator.inspect({"source": src})]
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    ns = {"Optional": Optional}
    exec(src, ns)
    assert names == [k for k in ns if k not in ("__builtins__", "__annotations__", "Optional")]
