#!/usr/bin/env bash
# Issue 20's grid: the variant chosen on dev (benchmarks/frozen_study/choice.json) on 7 tasks x 5 seeds, as two
# 1-thread processes sharing benchmarks/results-frozen/ (resumable: finished runs are skipped). Its rows sit
# beside the methods that read no store (prompt, demo-text, fine-tune, linear-probe), copied from issue 11's grid
# in benchmarks/results/ (those methods run the same code path; the copy keeps their settings ids), and beside
# the chosen variant's 9 study runs (the same runs: same settings, same key).
#   HELD_OUT=1: then the held-out tasks CoLA, MRPC, RTE, QNLI (5 seeds, one seed at a time so that a stopped run
#   leaves whole seeds) with prompt, the chosen variant, retro-no-demo, the linear probe and fine-tuning, into
#   benchmarks/results-frozen-heldout/. Nothing is tuned on them: every choice was made on the 3 dev tasks.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
OUT=${OUT:-benchmarks/results-frozen}
CHOICE=benchmarks/frozen_study/choice.json
read -r CHOSEN METHOD CONFIG GRID < <($PY - "$CHOICE" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
print(c["chosen"], c["method"], json.dumps(c["config"], separators=(",", ":")), c["mixture_grid"])
PY
)
mkdir -p "$OUT"
if [ ! -s "$OUT/results.jsonl" ]; then
  $PY - "$OUT" "$CHOSEN" <<'PY'
import json, sys
out, chosen = sys.argv[1], sys.argv[2]
keep = ("prompt", "demo-text", "fine-tune", "linear-probe")
rows = [line for line in open("benchmarks/results/results.jsonl") if json.loads(line)["method"] in keep]
rows += list(open(f"benchmarks/frozen_study/{chosen}/results.jsonl"))
with open(f"{out}/results.jsonl", "w") as f:
    f.writelines(r if r.endswith("\n") else r + "\n" for r in rows)
PY
fi
grid() {  # out tasks seeds methods
  for lane in 1 2; do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice $PY -m openprompt_retro benchmark --tasks "$2" --seeds "$3" \
        --methods "$4" --config "$CONFIG" --mixture-grid "$GRID" --out "$1" --no-progress &
    sleep 5
  done
  wait
}
grid "$OUT" SST-2,sst-5,mr,cr,mpqa,subj,trec 13,21,42,87,100 "$METHOD"
if [ "${HELD_OUT:-0}" = 1 ]; then
  for seed in 13 21 42 87 100; do
    grid benchmarks/results-frozen-heldout CoLA,MRPC,RTE,QNLI "$seed" "prompt,$METHOD,retro-no-demo,linear-probe,fine-tune"
  done
fi
