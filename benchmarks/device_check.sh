#!/usr/bin/env bash
# The GPU checks of issues 13 and 17 as one short run, for a session whose task is lent a GPU
# (the library's device tool; about 5 minutes of its 15). Prepare on the CPU machine, then run:
#   python benchmarks/device_data.py ../shared/data/cifar10/cifar10-jpg.tar.gz runs/device-data/cifar10-small.tar.gz
#   device run: command "bash benchmarks/device_check.sh", carry ["runs/device-data"], timeout_s 600 (the checks stop themselves by 560 s)
# Each check has its own time limit and the script goes on after a failure, so that one broken
# check does not waste the lease; what each wrote comes back from $OUT (8 files: device.json,
# the two speed JSONs, sweep-results.csv, the two functa metrics.jsonl, rc.txt, checks.txt with the logs).
#   1. bench_prune_speed.py --device cuda on the published base ViT, batch 64 and 1024;
#   2. nnlab prune sweep --device cuda: every method at ratio 0.5 on the small CIFAR-10 archive
#      (P-ViT gates and fine-tuning, AP-ViT agents, APT's joint training, CP-ViT heads, ToMe);
#   3. nnlab functa train on the GPU, eager and --compile, 40 meta-steps each (ms per step).
# DEVICE=cpu CHECKPOINT=RUN OUT=DIR runs the same checks here, to try the script (LIMIT_PERCENT=10
# cuts every time limit to a tenth, to try it quickly).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
CHECKPOINT=${CHECKPOINT:-docs/results/vit-cifar/base}
DATA=${DATA:-runs/device-data/cifar10-small.tar.gz}
OUT=${OUT:-runs/device-check}
PY=${PY:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
: > "$OUT/rc.txt"

check() {  # check NAME SECONDS COMMAND...: run it with a time limit, log it, record its exit status
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$(( limit * ${LIMIT_PERCENT:-100} / 100 ))" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" >> "$OUT/rc.txt"
  tail -n 3 "$OUT/$name.log"
}

$PY - > "$OUT/device.json" <<'EOF'
import json, torch
gpu = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if gpu else None}))
EOF
cat "$OUT/device.json"

for bs in 64 1024; do
  check "prune-speed-b$bs" 80 $PY benchmarks/bench_prune_speed.py --device "$DEVICE" --checkpoint "$CHECKPOINT" \
    --batch-size "$bs" --json "$OUT/prune-speed-b$bs.json"
done
check prune-sweep 180 $PY -m nnlab prune sweep --checkpoint "$CHECKPOINT" --data-dir "$DATA" --device "$DEVICE" \
  --methods p-vit,ap-vit,ap-vit-joint,cp-vit,tome --ratios 0.5 --calib-size 256 --pvit-train-limit 1000 \
  --apvit-joint-train-limit 1000 --apvit-epochs 2 --no-save-models --out "$OUT/sweep"
cp "$OUT/sweep/results.csv" "$OUT/sweep-results.csv" 2>/dev/null
for spec in eager:80: compile:120:--compile; do  # mode:time limit:flag
  IFS=: read -r mode limit flag <<< "$spec"
  check "functa-$mode" "$limit" $PY -m nnlab functa train --preset celeba64-cpu --data cifar10 --data-dir "$DATA" \
    --steps 40 --val-every 1000 --device "$DEVICE" --no-progress $flag --out "$OUT/functa-$mode"
  cp "$OUT/functa-$mode/metrics.jsonl" "$OUT/functa-$mode-metrics.jsonl" 2>/dev/null
done
# At most 8 files come back: the JSON/CSV results, rc.txt, and every log in one file.
for log in "$OUT"/*.log; do echo "===== $(basename "$log")"; cat "$log"; done > "$OUT/checks.txt"
rm -rf "$OUT"/*.log "$OUT/sweep" "$OUT/functa-eager" "$OUT/functa-compile"
cat "$OUT/rc.txt"
