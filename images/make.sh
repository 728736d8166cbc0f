#!/usr/bin/env bash
# The one command that rewrites images/ (the README's figures). Nothing else writes here: notebooks, jobs and tests
# save their figures to their out_dir; this command sets LUPNL_IMAGES=1, so that `lupnl.runs.save_figure` also
# writes the notebooks' figures into images/. Run from anywhere, after the README's quick start (it uses .venv/):
#   bash images/make.sh            # data, noise, pre-training, fine-tuning, retrieval, widget figures (~15 min on 2 cores)
#   bash images/make.sh --all      # also the 24-epoch ablation and the prototype-update benchmark (much longer)
# The real-data figures (MOT17, CUHK03, Market) need ../shared/data beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
tmp=$(mktemp -d -t lupnl_figures_XXXX)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread: fast and repeatable on a shared 2-core machine
unset MPLBACKEND                               # papermill keeps inline figures only with the notebook backend
run() { echo "== $*"; "$@"; }

export LUPNL_IMAGES=1   # lupnl.runs.save_figure also writes the notebooks' figures into images/ (nothing else sets it)

for nb in 00a_toy 01_explore; do
  run $BIN/papermill --log-level WARNING nbs/$nb.ipynb "$tmp/$nb.ipynb"
done
run $BIN/papermill --log-level WARNING nbs/03_pretrain.ipynb "$tmp/03.ipynb" -p out_dir "$tmp/pretrain"
run $BIN/papermill --log-level WARNING nbs/04_finetune.ipynb "$tmp/04.ipynb" -p out_dir "$tmp/finetune"
run $BIN/papermill --log-level WARNING nbs/05_evaluate.ipynb "$tmp/05.ipynb" -p out_dir "$tmp/evaluate"
# the widget screenshots, from a model worth looking at: 24 epochs of PNL on the built-in data, then JupyterLab + Chromium
run $BIN/python -m lupnl.pretrain --out_dir "$tmp/pnl24" --epochs 24 --lr_steps 18 --eval_every 6
run $BIN/python tests/test_widgets_browser.py --out images --checkpoint "$tmp/pnl24/checkpoint.pth"
if [ "${1:-}" = "--all" ]; then
  run $BIN/papermill --log-level WARNING nbs/03_pretrain.ipynb "$tmp/03a.ipynb" -p out_dir "$tmp/ablation" -p run_ablation True
  run $BIN/python -m tests.bench_prototypes --plot images/models_prototype_update_bench.png
fi
echo "figures written to images/; notebooks and runs of this command are in $tmp"
