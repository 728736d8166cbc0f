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
