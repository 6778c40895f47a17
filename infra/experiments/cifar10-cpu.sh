#!/usr/bin/env bash
# The issues' learning check on ../shared/data/cifar10-10k on a 2-core CPU machine, about 30 minutes:
# 8,000 images (800 per class) are pretrained on without labels; the other 2,000 are held out with labels
# for the online kNN and the final probe (kNN + linear, pretrained vs random init, 70/30 split).
#   bash infra/experiments/cifar10-cpu.sh byol|ijepa [STEPS] [extra dotted overrides…]
set -euo pipefail
cd "$(dirname "$0")/../.."
METHOD=${1:?usage: cifar10-cpu.sh byol|ijepa [STEPS] [overrides…]}; shift
STEPS=${1:-600}; shift || true
SRC=${SRC:-../shared/data/cifar10-10k}
OUT=${OUT:-$PWD/experiment-output/cifar10}
PY=.venv/bin/python
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}
mkdir -p "$OUT"
if [ ! -f "$OUT/pretrain/manifest.json" ]; then
  $PY - "$SRC" "$OUT" <<'PY'
import shutil, sys
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
for cls in sorted(p for p in src.iterdir() if p.is_dir()):
    files = sorted(cls.glob("*.jpg"))
    for split, part in (("pretrain-src", files[:800]), ("heldout-src", files[800:])):
        (out / split / cls.name).mkdir(parents=True, exist_ok=True)
        for f in part:
            shutil.copy(f, out / split / cls.name / f.name)
PY
  .venv/bin/raysl data shard "$OUT/pretrain-src" "$OUT/pretrain" --format parquet --rows-per-shard 1000
  .venv/bin/raysl data shard "$OUT/heldout-src" "$OUT/heldout" --format parquet --rows-per-shard 1000
fi
.venv/bin/raysl pretrain --config "$METHOD-cifar-cpu" data.uri="$OUT/pretrain" eval.uri="$OUT/heldout" \
  train.steps="$STEPS" train.storage_path="$OUT/runs" "$@" | tee "$OUT/pretrain-$METHOD.json"
.venv/bin/raysl probe --model "models:/raysl-$METHOD-cifar-encoder@candidate" --data "$OUT/heldout" \
  | tee "$OUT/probe-$METHOD.txt"
