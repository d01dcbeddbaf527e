#!/usr/bin/env bash
# The whole chain on real KiTS23 geometry: two reference segmentations become phantom
# CT cases, a smoke-sized model trains on them, predicts both and is scored.
#
# Usage: examples/real_geometry.sh [LABELS_DIR] [WORK_DIR]
#   LABELS_DIR  folder of KiTS23 CASE.nii.gz segmentations (default: ../shared/data/kits23/labels)
#   WORK_DIR    where the phantom data, run and predictions go (default: a new temporary folder)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
labels="${1:-$repo/../shared/data/kits23/labels}"
work="${2:-$(mktemp -d -t kitsjobs-real-XXXXXX)}"
python="${PYTHON:-$repo/.venv/bin/python}"
cases=(case_00061 case_00257)

if [ ! -d "$labels" ]; then
    echo "error: labels folder $labels not found; pass the folder of KiTS23 CASE.nii.gz files" >&2
    exit 2
fi

echo "== phantom images for ${cases[*]} in $work/data"
"$python" -m kitsjobs.data.phantom "$labels" "$work/data" --cases "${cases[@]}"

echo "== training (experiment=smoke, 2 folds: one case trains, one validates)"
"$python" -m kitsjobs.launch experiment=smoke data=kits23 data.root="$work/data" \
    data.num_folds=2 hydra.run.dir="$work/run"

echo "== predicting both cases"
"$python" -m kitsjobs.predict --checkpoint "$work/run/checkpoints/best.pt" \
    --input "$work/data" --output "$work/predictions"

echo "== scoring"
"$python" -m kitsjobs.evaluate --predictions "$work/predictions" --references "$work/data" \
    --csv "$work/scores.csv"
echo "scores: $work/scores.csv"
