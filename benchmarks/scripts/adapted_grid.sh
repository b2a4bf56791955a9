#!/usr/bin/env bash
# The grid of today's default: retro with the default chosen on dev (benchmarks/adapted_study/choice.json) and the SetFit baseline
# (the setfit package, its defaults; pip install -e ".[setfit]") on 7 tasks x 5 seeds into benchmarks/results-adapted/,
# and on the held-out tasks CoLA, MRPC, RTE, QNLI x 5 seeds into benchmarks/results-adapted-heldout/, one seed at a
# time (both sets), so that a stopped grid leaves whole seeds. Two 1-thread processes share each folder (resumable: finished runs
# are skipped). prompt, fine-tune, linear-probe and today's frozen-key retro are the rows of
# benchmarks/results-frozen(-heldout) on the same splits (their code paths are unchanged);
# benchmarks/scripts/adapted_tables.py puts them side by side.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
OUT=${OUT:-benchmarks}  # where results-adapted(-heldout)/ go
CHOICE=benchmarks/adapted_study/choice.json
read -r METHOD CONFIG GRID < <($PY - "$CHOICE" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
print(c["method"], json.dumps(c["config"], separators=(",", ":")), c["mixture_grid"])
PY
)
grid() {  # out tasks seeds methods
  for lane in 1 2; do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice $PY -m openprompt_retro benchmark --tasks "$2" --seeds "$3" \
        --methods "$4" --config "$CONFIG" --mixture-grid "$GRID" --out "$1" --no-progress &
    sleep 5
  done
  wait
}
for seed in 13 21 42 87 100; do
  grid "$OUT/results-adapted" SST-2,sst-5,mr,cr,mpqa,subj,trec "$seed" "$METHOD,setfit"
  grid "$OUT/results-adapted-heldout" CoLA,MRPC,RTE,QNLI "$seed" "$METHOD,setfit"
done
