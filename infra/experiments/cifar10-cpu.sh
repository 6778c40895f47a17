#!/usr/bin/env bash
# The issues' learning check on ../shared/data/cifar10-10k on a 2-core CPU machine, about 30 minutes:
# 8,000 images (800 per class) are pretrained on without labels; the other 2,000 are held out with labels
# for the online kNN and the final probe (kNN + linear, pretrained vs random init, 70/30 split).
# For clip, every image also gets a caption drawn from varied phrasings of its class name (phrasings
# that differ from the zero-shot prompt templates), and the run ends with `raysl probe --zero-shot`.
#   bash infra/experiments/cifar10-cpu.sh byol|ijepa|clip [STEPS] [extra dotted overrides…]
set -euo pipefail
cd "$(dirname "$0")/../.."
METHOD=${1:?usage: cifar10-cpu.sh byol|ijepa|clip [STEPS] [overrides…]}; shift
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
DATA=pretrain HELD=heldout
if [ "$METHOD" = clip ]; then
  DATA=pretrain-captioned HELD=heldout-captioned
  if [ ! -f "$OUT/$HELD/manifest.json" ]; then
    for split in pretrain heldout; do
      $PY - "$OUT/$split-src" <<'PY'
import csv, random, sys
from pathlib import Path
root = Path(sys.argv[1])
phrases = ["{a} {c}", "this is {a} {c}", "there is {a} {c} here", "{a} {c}, seen up close", "look at this {c}",
           "my {c}", "{c}", "an image showing {a} {c}", "{a} {c} outdoors", "a snapshot: {c}"]
rng = random.Random(0)
with open(root / "captions.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file", "caption"])
    for img in sorted(root.glob("*/*.jpg")):
        c = img.parent.name
        a = "an" if c[0] in "aeiou" else "a"
        w.writerow([f"{c}/{img.name}", rng.choice(phrases).format(a=a, c=c)])
PY
      .venv/bin/raysl data shard "$OUT/$split-src" "$OUT/$split-captioned" --format parquet --rows-per-shard 1000 \
        --captions "$OUT/$split-src/captions.csv"
    done
  fi
fi
.venv/bin/raysl pretrain --config "$METHOD-cifar-cpu" data.uri="$OUT/$DATA" eval.uri="$OUT/$HELD" \
  train.steps="$STEPS" train.storage_path="$OUT/runs" "$@" | tee "$OUT/pretrain-$METHOD.json"
if [ "$METHOD" = clip ]; then
  .venv/bin/raysl probe --zero-shot --model "models:/raysl-clip-cifar@candidate" --data "$OUT/$HELD" \
    | tee "$OUT/zero-shot-clip.txt"
  .venv/bin/raysl probe --model "models:/raysl-clip-cifar@candidate" --data "$OUT/$HELD" | tee "$OUT/probe-clip.txt"
else
  .venv/bin/raysl probe --model "models:/raysl-$METHOD-cifar-encoder@candidate" --data "$OUT/heldout" \
    | tee "$OUT/probe-$METHOD.txt"
fi
