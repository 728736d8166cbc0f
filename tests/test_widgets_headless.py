"""Issue 22: `nbs/06_widgets.ipynb` run headless saves static PNGs of both views and says what it shows; the cluster explorer
shows a checkpoint's own data, or says loudly that it falls back to the built-in data."""
import json, os, subprocess, sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NB = REPO / "nbs" / "06_widgets.ipynb"


@pytest.mark.slow
def test_headless_run_saves_both_views(tmp_path, env):
    "`papermill nbs/06_widgets.ipynb OUT -p out_dir DIR`: two PNGs in DIR; the notebook prints its model, data and benchmark with their sizes."
    figs = tmp_path / "figs"
    res = subprocess.run([sys.executable, "-m", "papermill", str(NB), str(tmp_path / "out.ipynb"), "-p", "out_dir", str(figs),
                          "-p", "pool_size", "150", "-p", "sample_size", "120"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("widgets_cluster_explorer.png", "widgets_retrieval_browser.png"):
        with Image.open(figs / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200, (name, im.size)
    printed = "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                      for c in json.loads((tmp_path / "out.ipynb").read_text())["cells"] if c["cell_type"] == "code"
                      for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "model: an untrained ResNet-18" in printed, printed[-2000:]
    toy = Path(env["LUPNL_DATA"]) / "toy"
    assert f"cluster explorer: {toy}" in printed and "150 embedded, 120 on the map" in printed, printed[-2000:]
    assert f"retrieval browser: {toy}" in printed and "100 queries" in printed, printed[-2000:]
    assert str(figs / "widgets_retrieval_browser.png") in printed


def _finetune_checkpoint(path, data):
    "A fine-tuning checkpoint (untrained BoT, 48x24) whose run trained on the benchmark folder `data`, as `lupnl.finetune.train` writes it."
    from lupnl.checkpoints import save_checkpoint
    from lupnl.finetune import FinetuneConfig, build_model
    cfg = FinetuneConfig(img_size=(48, 24), data=data and str(data))
    save_checkpoint(dict(epoch=1, model=build_model(cfg, 9)[0].state_dict(), optimizer={}, scaler={}, num_classes=9,
                         config=asdict(cfg)), path)
    return path


def test_explorer_shows_the_checkpoints_own_data(tmp_path, tiny_bench, data_home, monkeypatch):
    "A model fine-tuned on another benchmark (say CUHK03) is explored on that benchmark's training images, never silently on the cartoons."
    import warnings
    from lupnl.checkpoints import load_model
    from lupnl.widgets import explorer_data
    monkeypatch.setenv("LUPNL_DATA", str(data_home))
    model = load_model(_finetune_checkpoint(tmp_path / "ft.pth", tiny_bench))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                          # no fallback, so no warning
        ds = explorer_data(model)
    assert str(tiny_bench) in str(ds.root) and len(ds) == len(list((tiny_bench / "bounding_box_train").glob("*.jpg")))
    img, label, _ = ds[0]
    assert tuple(img.shape[-2:]) == (48, 24) and label == ds.labels[0] and ds.image(0).mode == "RGB"
    # a benchmark without training images, or a model that names no data: the built-in LMDB, said loudly
    empty = tmp_path / "eval_only"
    for sub in ("query", "bounding_box_test"): (empty / sub).mkdir(parents=True)
    for f in list((tiny_bench / "query").glob("*.jpg"))[:2] + list((tiny_bench / "bounding_box_test").glob("*.jpg"))[:2]:
        (empty / f.parent.name / f.name).write_bytes(f.read_bytes())
    with pytest.warns(UserWarning, match=r"was trained on .*eval_only.*showing the built-in toy data"):
        ds = explorer_data(load_model(_finetune_checkpoint(tmp_path / "ft2.pth", empty)))
    assert Path(ds.root) == data_home / "toy" / "lupnl_nl"
    with pytest.warns(UserWarning, match="names no training data: showing the built-in toy data"):
        explorer_data(_bare_weights(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                          # a run on the built-in benchmark: built-in, unsaid
        ds = explorer_data(load_model(_finetune_checkpoint(tmp_path / "ft4.pth", None)))
    assert Path(ds.root) == data_home / "toy" / "lupnl_nl"


def _bare_weights(tmp_path):
    "A model loaded from bare trunk weights (no run config)."
    import torch
    from lupnl.checkpoints import export_backbone, load_model
    from lupnl.models import resnet_trunk
    (tmp_path / "bare").mkdir()
    torch.save(export_backbone(resnet_trunk("resnet18")), tmp_path / "bare" / "backbone.pth")
    with pytest.warns(UserWarning, match="crop size is not stored"):
        return load_model(tmp_path / "bare" / "backbone.pth")
