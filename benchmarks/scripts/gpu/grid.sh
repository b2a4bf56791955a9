#!/usr/bin/env bash
# The protocol search and the benchmark grid on a GPU machine (experiments/protocol.py), with WORKERS
# processes sharing one GPU. Results are tarred into RESULTS_DIR every 20 s, so a run cut short still
# returns every finished row; resume anywhere with the same command (finished runs are skipped).
#   BUDGET=480 WORKERS=14 bash benchmarks/scripts/gpu/grid.sh RESULTS_DIR
set -u
DEST=${1:-/tmp/gpu-grid}; mkdir -p "$DEST"
W=${WORKERS:-14}; BUDGET=${BUDGET:-480}; WORK=${WORK:-/tmp/w}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
pack() { tar czf "$DEST/runs.tgz.tmp" --exclude=.claims --exclude='*.lock' --exclude='*.tmp.*' -C "$WORK" . \
         && mv "$DEST/runs.tgz.tmp" "$DEST/runs.tgz"; }
( while true; do sleep 20; pack; done ) &
PACKER=$!
start=$(date +%s)
timeout "$BUDGET" python3 -m openprompt_retro protocol --workers "$W" --out "$WORK/search" \
  --grid-out "$WORK/results" --no-progress > "$WORK/protocol.log" 2>&1
echo "protocol rc $? after $(( $(date +%s) - start )) s"
kill $PACKER; pack
tail -40 "$WORK/protocol.log"
for f in "$WORK"/search/protocol/*/results.jsonl "$WORK"/search/variants/*/results.jsonl "$WORK"/results/results.jsonl; do
  [ -f "$f" ] && echo "$(wc -l < "$f") rows: $f"
done
