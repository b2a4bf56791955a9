#!/usr/bin/env bash
# Seed 100 of the adapted grid (retro and SetFit) ran on another machine than every other row; prompt tuning is
# re-run there for seed 100, on the 7 tasks and the held-out tasks, as two 1-thread processes like the grid, so that
# adapted_tables.py times each retro run against a prompt run on the same machine. Resumable.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
OUT=${OUT:-benchmarks/timing-seed100}
for lane in 1 2; do
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice $PY -m openprompt_retro benchmark \
      --tasks SST-2,sst-5,mr,cr,mpqa,subj,trec,CoLA,MRPC,RTE,QNLI --seeds 100 --methods prompt --out "$OUT" --no-progress &
  sleep 5
done
wait
