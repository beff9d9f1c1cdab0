#!/usr/bin/env bash
# Quality sweep on the lent GPU machine (see docs/method.md): each line one bench/quality.py run.
#   OUT=/tmp/sweep bash bench/gpu_sweep.sh NAME "ARGS" [NAME "ARGS" ...]
# Writes JSON_DIR/NAME.json per run (default $OUT) and one summary line per (method, seed)
# to $OUT/summary.jsonl, written as each run ends.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:?set OUT}
JSON_DIR=${JSON_DIR:-$OUT}
mkdir -p "$OUT" "$JSON_DIR"
[ -f .state/world-0/eval.parquet ] || $PY -c "from xbtcore import world; world.write_world('.state/world-0')"
while [ $# -ge 2 ]; do
  name=$1; args=$2; shift 2
  echo "== $name: $args" >&2
  # shellcheck disable=SC2086
  $PY bench/quality.py --device "$DEVICE" --json-out "$JSON_DIR/$name.json" $args 2>&1 >/dev/null | grep -v "^Loading weights" | tee -a "$OUT/log.txt" \
    | grep '^{"method' | sed "s/^{/{\"run\": \"$name\", /" | tee -a "$OUT/summary.jsonl"
done
