"""lupnl.clean from the command line and on bad or awkward input: what a notebook cannot check."""
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lupnl.clean import propose_cleaning, suspect_scores, merge_scores, average_linkage_merges, write_cleaned
from lupnl.data import LMDBDataset


def test_command_line_writes_cleaned_labels(finished, tiny_lmdb, tmp_path):
    "The issue's done-when: keys.pkl (readable by --data), changes.csv and scores.json with the scores against the truth."
    out = tmp_path / "cleaned"
    res = subprocess.run([sys.executable, "-m", "lupnl.clean", str(Path(finished.out_dir) / "checkpoint.pth"), "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    scores = json.loads((out / "scores.json").read_text())              # strict JSON: no NaN
    assert {"auprc", "bcubed_f_before", "bcubed_f_after", "n_fixed", "n_neutral", "n_broken"} <= set(scores)
    assert scores["data"] == str(Path(finished.data).resolve()) or Path(scores["data"]) == Path(finished.data)
    cleaned, src = LMDBDataset(out), LMDBDataset(tiny_lmdb)
    assert len(cleaned) == len(src) and list(cleaned.meta["pids_before"]) == list(src.labels)
    lines = (out / "changes.csv").read_text().splitlines()
    assert lines[0] == "crop,old_label,new_label,score,kind" and len(lines) - 1 == scores["moves"] + scores["merges"]
    json.loads(res.stdout.strip().splitlines()[-1])                     # the printed summary is strict JSON too


def test_cleaning_into_its_own_data_folder_is_refused(tiny_lmdb, tmp_path):
    import hashlib
    digest = lambda: {f: hashlib.sha256((Path(tiny_lmdb) / f).read_bytes()).hexdigest() for f in ("keys.pkl", "data.mdb")}
    before = digest()
    with pytest.raises(ValueError, match="is the data folder itself"):
        write_cleaned(tiny_lmdb, tiny_lmdb, LMDBDataset(tiny_lmdb).labels, [], {})
    assert digest() == before and not (Path(tiny_lmdb) / "data.mdb").is_symlink()   # the data is untouched


def test_unlabelled_crops_are_never_a_target():
    "Label -1 (unlabelled) is never proposed for a crop, and never merged with a label."
    g = torch.Generator().manual_seed(0)
    dirs = F.normalize(torch.randn(3, 16, generator=g), dim=1)
    ident = np.repeat([0, 1, 2], 10)
    feats = F.normalize(dirs[ident] + 0.05 * torch.randn(30, 16, generator=g), dim=1)
    labels = np.where(ident == 2, -1, ident)                           # identity 2: all unlabelled
    labels[20] = 0                                                     # one of its crops labelled 0 (wrong)
    s = suspect_scores(feats, labels)
    assert (s["proposal"] >= 0).all()
    assert all(a >= 0 and b >= 0 for _, a, b in merge_scores(feats, labels))
    after, _, changes = propose_cleaning(feats, labels, {}, move_threshold=0.5, merge_threshold=0.0)
    assert (after[labels == -1] == -1).all() and not any(-1 in (c[1], c[2]) for c in changes if c[4] == "merge")
    assert (average_linkage_merges(feats, labels, {}, threshold=-1.0)[labels == -1] == -1).all()


def test_changes_csv_holds_the_final_labels():
    "A merge chain (2 -> 1 -> 0) is written as the final label of each change, the one keys.pkl gets."
    g = torch.Generator().manual_seed(1)
    d = F.normalize(torch.randn(16, generator=g), dim=0)
    feats = F.normalize(d + 0.01 * torch.randn(30, 16, generator=g), dim=1)   # one person in three labels
    labels = np.repeat([0, 1, 2], 10)
    after, _, changes = propose_cleaning(feats, labels, {}, move_threshold=2.0, merge_threshold=0.0)
    assert len(set(after)) == 1 and all(c[2] == after[0] for c in changes)
