"""`lupnl.tracks` on the real tracking data of ../shared/data/mot-real: tracker labels with the truth, the noise report
and tracker scores, the held-out benchmark, the errors a user sees, and `python -m lupnl.tracks` into
`python -m lupnl.pretrain`."""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

from lupnl import tracks as T
from lupnl.data import LMDBDataset, read_benchmark
from lupnl.noise import measure_noise

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MPLBACKEND": "Agg",
       "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}


@pytest.fixture(scope="module")
def mot(shared_data):
    return shared_data / "mot-real"


def run_main(capsys, *argv):
    "`lupnl.tracks.main(argv)` in this process -> (exit status, stdout, stderr)."
    try: T.main([str(a) for a in argv]); code = 0
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cem_on_tud_campus(mot, tmp_path, capsys):
    "The issue's example: labels from CEM, the truth beside them, and the devkit's scores for this file (data README, section 7)."
    code, out, err = run_main(capsys, mot / "TUD-Campus", "--tracker", "CEM", "--out", tmp_path / "cem", "--quiet")
    assert code == 0, err
    assert "TUD-Campus" in out and "bcubed_f" in out
    ds = LMDBDataset(tmp_path / "cem")
    m = ds.meta
    assert (len(ds), ds.num_classes) == (222, 13)
    true = np.asarray(m["true_pids"])
    assert sorted(set(true)) == [-1, *range(8)]                        # 8 people, junk -1
    assert set(m["camids"]) == {0} and set(m["videos"]) == {"TUD-Campus"}
    assert len(m["boxes"]) == len(m["frames"]) == len(m["tracks"]) == len(m["true_tracks"]) == 222
    rep = json.loads((tmp_path / "cem" / "noise_report.json").read_text())
    r = rep["sequences"]["TUD-Campus"]
    assert (rep["tracker"], rep["min_height"], rep["every_k"]) == ("CEM", 32, 1)
    assert (round(r["mota"], 3), round(r["idf1"], 3), r["fp"], r["fn"], r["idsw"]) == (0.526, 0.558, 13, 150, 7)
    assert r["bcubed_f"] == pytest.approx(measure_noise(ds.labels, true)["bcubed_f"])
    assert r["junk"] == pytest.approx((true < 0).mean())


def test_truth_is_a_one_to_one_match(mot):
    "Every crop with a truth overlaps that gt box by IoU >= 0.5 in its frame, and no gt box is given to two crops."
    seq = mot / "ADL-Rundle-6"
    trk = T.tracker_table(seq, "SORT")
    gt = T.read_mot(seq / "gt" / "gt.txt")
    truth = T.match_truth(trk, gt)
    hit = trk.assign(truth=truth)[truth >= 0]
    assert 0.5 < len(hit) / len(trk) < 1
    assert not hit.duplicated(["frame", "truth"]).any()
    g = gt.set_index(["frame", "id"])
    for r in hit.sample(200, random_state=0).itertuples():
        b = g.loc[(r.frame, r.truth)]
        assert T.box_iou([[r.x, r.y, r.w, r.h]], [[b.x, b.y, b.w, b.h]])[0, 0] >= 0.5


def test_gt_tracker_gives_clean_labels(mot, tmp_path):
    out, rep = T.tracks_dataset([mot / "TUD-Campus", mot / "MOT16-05"], tmp_path / "gt", "gt", progress=False)
    ds = LMDBDataset(out)
    assert ds.labels.tolist() == ds.meta["true_pids"]
    assert set(ds.meta["camids"]) == {0, 1}
    assert rep.loc["all", "purity"] == rep.loc["all", "bcubed_f"] == 1.0
    assert (rep.loc["TUD-Campus", "mota"], rep.loc["TUD-Campus", "idf1"]) == (1.0, 1.0)


@pytest.mark.parametrize("seq, tracker, ignored_gt", [("PETS09-S2L1", "SORT", "flag 0"), ("MOT16-02", "DeepSORT", "class / conf")])
def test_boxes_on_ignored_gt_are_dropped(mot, seq, tracker, ignored_gt):
    "MOT15 / PETS flag-0 and MOT16 non-counted gt boxes are no identities; tracker boxes on them are dropped, not junk."
    gt = T.read_mot(mot / seq / "gt" / "gt.txt")
    st = T.gt_status(gt)
    assert (st == 0).sum() > 0
    plans, rep = T.tracker_noise([mot / seq], tracker)
    p = plans[0]
    dropped = int((p.truth == T.TRUTH_IGNORED).sum())
    assert dropped > 0 and rep.loc[seq, "ignored"] == dropped and rep.loc[seq, "crops"] == len(p) - dropped
    assert set(p.truth[p.truth >= 0]) <= set(gt.id[st == 1])            # identities only from counted boxes


def test_sequences_without_gt(mot, tmp_path):
    "A user's own video (frames and a tracker's output, no gt): labels without truth; mixed with gt sequences: refused."
    own = tmp_path / "own" / "MY-VIDEO"
    (own / "trackers").mkdir(parents=True)
    (own / "img1").symlink_to(mot / "TUD-Campus" / "img1")
    (own / "trackers" / "CEM.txt").symlink_to(mot / "TUD-Campus" / "trackers" / "CEM.txt")
    out, rep = T.tracks_dataset([own], tmp_path / "nogt", "CEM", progress=False)
    ds = LMDBDataset(out)
    assert (len(ds), ds.num_classes) == (222, 13) and "true_pids" not in ds.meta
    assert list(rep.columns) == ["crops", "labels"]
    with pytest.raises(T.DataError, match="have no gt/gt.txt"):
        T.tracks_dataset([mot / "TUD-Campus", own], tmp_path / "mixed", "CEM", progress=False)


def test_min_height_and_stride(mot):
    p = T.label_sequence(mot / "TUD-Campus", "CEM", min_height=200, every_k=5)
    assert len(p) and ((p.y1 - p.y0) >= 200).all() and ((p.frame - 1) % 5 == 0).all()
    assert len(p) < len(T.label_sequence(mot / "TUD-Campus", "CEM"))


def test_folder_uses_sequences_with_the_tracker(mot):
    train, bench, skipped = T._resolve(T._parser().parse_args([str(mot), "--tracker", "CEM", "--out", "x"]))
    assert [s.name for s in train] == ["TUD-Campus"] and not bench and len(skipped) == 10
    train, bench, _ = T._resolve(T._parser().parse_args([str(mot), "--tracker", "SORT", "--out", "x",
                                                         "--bench_sequences", "TUD-Campus", "PETS09-S3MF1"]))
    assert [s.name for s in train] == ["ADL-Rundle-6", "PETS09-S2L1"]
    assert [s.name for s in bench] == ["TUD-Campus", "PETS09-S3MF1"]


def test_bench_of_held_out_sequences(mot, tmp_path, capsys):
    "Held-out sequences become a Market-1501-layout benchmark: query and gallery from different halves (cameras)."
    code, out, err = run_main(capsys, mot / "MOT16-02", mot / "MOT16-09", mot / "PETS09-S3MF1", "--tracker", "DeepSORT",
                              "--bench_sequences", "MOT16-09", "PETS09-S3MF1", "--out", tmp_path / "d", "--quiet")
    assert code == 0, err
    assert set(LMDBDataset(tmp_path / "d").meta["videos"]) == {"MOT16-02"}
    b = read_benchmark(tmp_path / "d" / "bench", train=False)
    assert len(b.query) >= 10 and len(b.gallery) > 10 * len(b.query)
    assert {it.camid for it in b.query} == {0, 2}                       # first halves: cameras 1 and 3
    for q in b.query:                                                  # a positive in the other half of its sequence
        assert any(g.pid == q.pid and g.camid == q.camid + 1 for g in b.gallery)
    assert not {Path(it.path).name for it in b.query} & {Path(it.path).name for it in b.gallery}


def test_user_errors_are_one_line_exit_2(mot, tmp_path, capsys, monkeypatch):
    (tmp_path / "done").mkdir(); (tmp_path / "done" / "data.mdb").write_bytes(b"")
    cases = [((tmp_path / "nowhere", "--out", tmp_path / "x"), "MOT folder not found"),
             ((mot / "PETS09-S3MF1", "--tracker", "SORT", "--out", tmp_path / "x"), "no tracker 'SORT' here"),
             ((mot / "TUD-Campus", "--out", tmp_path / "done"), "already holds an LMDB"),
             ((mot / "TUD-Campus", "--out", tmp_path / "x", "--min_iou", "0"), "--min_iou in (0, 1]"),
             ((mot / "TUD-Campus", "--out", tmp_path / "x", "--bench_sequences", "TUD-Campus"), "no sequence left to train on")]
    monkeypatch.setitem(sys.modules, "trackers", None)                 # ByteTrack's library not installed
    cases.append(((mot / "TUD-Campus", "--tracker", "bytetrack", "--out", tmp_path / "x"), "pip install trackers"))
    for argv, msg in cases:
        code, out, err = run_main(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and msg in err, (argv, err)
        assert err.startswith("python -m lupnl.tracks: error: ")
    assert not (tmp_path / "x").exists()


def test_bytetrack_links_public_detections(mot):
    pytest.importorskip("trackers")
    plans, rep = T.tracker_noise([mot / "TUD-Campus"], "bytetrack")
    r = rep.loc["TUD-Campus"]
    assert r["crops"] > 150 and r["labels"] < 20 and 0.3 < r["mota"] < 0.9 and r["idf1"] > 0.3
    assert set(plans[0].truth) - {T.TRUTH_JUNK, T.TRUTH_IGNORED} <= set(range(1, 9))


def test_module_entry_point(tmp_path):
    "`python -m lupnl.tracks`: --help without torch; a bad folder is one line on stderr and exit status 2."
    probe = ("import runpy, sys\nsys.argv = ['lupnl.tracks', '--help']\n"
             "try: runpy.run_module('lupnl.tracks', run_name='__main__')\nexcept SystemExit: pass\n"
             "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=ENV, capture_output=True, text=True, check=True)
    assert "--bench_sequences" in out.stdout and out.stdout.strip().endswith("TORCH False")
    res = subprocess.run([sys.executable, "-m", "lupnl.tracks", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "MOT folder not found" in res.stderr, res.stderr


@pytest.mark.slow
def test_tracks_then_pretrain(mot, tmp_path):
    "The issue's done-when: TUD-Campus labelled by CEM trains under `python -m lupnl.pretrain`, with the truth in keys.pkl."
    data = tmp_path / "tud_cem"
    res = subprocess.run([sys.executable, "-m", "lupnl.tracks", str(mot / "TUD-Campus"), str(mot / "PETS09-S3MF1"),
                          "--tracker", "CEM", "--bench_sequences", "PETS09-S3MF1", "--stride", "2", "--out", str(data), "--quiet"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "lupnl.pretrain", "--data", str(data), "--bench", str(data / "bench"),
                          "--epochs", "1", "--batch_size", "16", "--img_size", "32x16", "--out_dir", str(run)],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    rep = json.loads((data / "noise_report.json").read_text())["all"]
    assert row["purity_before"] == pytest.approx(rep["purity"]) and row["bcubed_f_before"] == pytest.approx(rep["bcubed_f"])
    assert 0 <= row["mAP"] <= 100 and (run / "checkpoint.pth").exists()
