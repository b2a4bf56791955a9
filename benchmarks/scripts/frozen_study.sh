#!/usr/bin/env bash
# Issue 20's variant study, on dev only: the frozen-encoder store's variants of `retro` on the protocol-search
# splits (SST-2, subj, trec x seeds 13/21/42), each in benchmarks/frozen_study/<variant>/. Resumable; every
# variant runs as two 1-thread processes sharing its folder (runs are claimed, none is done twice).
# Compared with the [MASK]-key rows of the same splits in benchmarks/results (issue 11's grid).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
OUT=${OUT:-benchmarks/frozen_study}
FROZEN='"demo_center": true, "key_encoder": "frozen-mean"'
variant() {  # name method config-json
  for lane in 1 2; do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice $PY -m openprompt_retro benchmark --tasks SST-2,subj,trec \
        --seeds 13,21,42 --methods "$2" --config "{$3}" --mixture-grid fine --out "$OUT/$1" --no-progress &
    sleep 5
  done
  wait
}
# demo_retrieval "mask": what this variant ran with (the default then); it has no demonstrations, so it changes
# nothing but the run's settings id, which keys by what a run ran with
variant nodemo-classmean retro-no-demo "$FROZEN, \"knn_readout\": \"class-mean\", \"demo_retrieval\": \"mask\""
variant demo-keyenc-classmean retro "$FROZEN, \"knn_readout\": \"class-mean\", \"demo_retrieval\": \"key-encoder\""
variant demo-keyenc-classmean-ce retro-no-knn-train "$FROZEN, \"knn_readout\": \"class-mean\", \"demo_retrieval\": \"key-encoder\""
# demonstrations drawn by the trained model's [MASK] keys, the frozen store for kNN: run last, after the grid
# (dev 83.4 against the choice's 83.8, so the choice stood). demo_retrieval must be "mask": "auto" with a frozen
# key encoder draws by the frozen keys.
variant demo-mask-classmean retro "$FROZEN, \"knn_readout\": \"class-mean\", \"demo_retrieval\": \"mask\""
# the read-out (top-k against class-mean on the same frozen keys) is compared on each run's weights by the
# diagnostic test_accuracy_by_inference.knn_only_by_readout, not by a variant of its own
