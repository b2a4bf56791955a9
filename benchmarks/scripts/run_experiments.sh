#!/usr/bin/env bash
# The experiments of benchmarks/README.md beyond the main benchmark, in one go (offline MiniLM, 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
# zero-shot: plain vs pseudo-labeled store (no labels read)
$PY -m openprompt_retro run --tasks SST-2,mr,cr,ag_news --methods zero-shot,zero-shot-retro --seeds 42 \
    --out benchmarks/zero_shot --no-progress --resume
# memorization: leave-one-out retraining at K=4 (8 examples), prompt tuning vs RetroPrompt
$PY -m openprompt_retro analyze --task SST-2 --seed 42 --shots 4 --out benchmarks/memorization --no-progress
# lambda sweep on dev + neighbours of one test prediction
$PY -m openprompt_retro figures --task SST-2 --seed 42 --out benchmarks/figures --no-progress
# accuracy against K (K=4, 8 drawn from the 16-shot split; K=16 is the split itself)
for shots in 4 8 16; do
  $PY -m openprompt_retro run --tasks SST-2 --methods prompt,retro --seeds 42 --shots $shots \
      --out benchmarks/k_sweep --no-progress --resume
done
$PY -m openprompt_retro plot-k benchmarks/k_sweep/results.jsonl --task SST-2 --png benchmarks/figures/accuracy_vs_k.png
# retrieval scales with the knowledge available: 16-shot store vs the labeled pool
$PY -m openprompt_retro big-pool --task SST-2 --seed 42 --out benchmarks/big_pool --no-progress
