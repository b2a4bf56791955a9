#!/usr/bin/env bash
# The adapted-keys study, on dev only: retro with keys adapted to the training labels (key_encoder "adapted",
# read-out chosen per run on dev) on the protocol's search splits (SST-2, subj, trec x seeds 13/21/42) and on the dev
# splits of three pair tasks (MRPC, RTE, QNLI x 13/21/42, relation keys), each variant in
# benchmarks/adapted_study/<variant>/. Compared with the frozen-key choice of the frozen study on the same splits
# (benchmarks/frozen_study/demo-keyenc-classmean, benchmarks/results-frozen-heldout). Resumable; every variant runs
# as two 1-thread processes sharing its folder (runs are claimed, none is done twice).
#   python benchmarks/scripts/adapted_study_table.py   # the table and the choice (choice.json)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
OUT=${OUT:-benchmarks/adapted_study}
ADAPTED='"demo_center": true, "key_encoder": "adapted", "knn_readout": "auto"'
variant() {  # name tasks method config-json
  for lane in 1 2; do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice $PY -m openprompt_retro benchmark --tasks "$2" \
        --seeds 13,21,42 --methods "$3" --config "{$4}" --mixture-grid fine --out "$OUT/$1" --no-progress &
    sleep 5
  done
  wait
}
# single texts adapted; sentence pairs keyed by relation features of the pre-trained encoder
variant adapted-auto SST-2,subj,trec,MRPC,RTE,QNLI retro "$ADAPTED"
# sentence pairs adapted too (their segments' cosine fitted to the labels)
variant adapted-auto-pairs MRPC,RTE,QNLI retro "$ADAPTED, \"adapt_pairs\": true"
# the frozen encoder's keys with today's code (the guard, the read-out chosen on dev): the same choice without
# adaptation, so the earlier frozen store's rows (no guard, joint pair keys) are not the only baseline. Single texts only:
# on pairs, adapted-auto keeps the pre-trained encoder (adapt_pairs false), so its pair runs are this variant's
variant frozen-auto SST-2,subj,trec retro '"demo_center": true, "key_encoder": "frozen-mean", "knn_readout": "auto"'
# how the kNN-guided loss weights adapted keys: from the pre-trained copy's keys (the loss store, as built) or
# off (plain cross-entropy, the retro-no-knn-train preset); pairs keep the pre-trained encoder, so single texts only
variant adapted-auto-ce SST-2,subj,trec retro-no-knn-train "$ADAPTED"
