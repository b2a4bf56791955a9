#!/usr/bin/env bash
# GPU checks of the code paths a CPU cannot run: the suite with CUDA visible, CLI runs with --device cuda
# and AMP (fp16 with its gradient scaler, bf16), and the nccl collective + a DDP-wrapped training step.
#   bash benchmarks/scripts/gpu/check.sh LOG_DIR        (from the repository root, on a machine with one GPU)
set -u
LOG=${1:-/tmp/gpu-check}; mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, faiss, openprompt_retro, openprompt; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), 'transformers', transformers.__version__, 'faiss', faiss.__version__)"
timeout 300 python3 -m pytest -q -n 4 -p no:cacheprovider -rs tests/ > "$LOG/pytest.log" 2>&1; echo "pytest rc $?"
tail -30 "$LOG/pytest.log"
for amp in none fp16 bf16; do
  flag=(); [ "$amp" != none ] && flag=(--amp "$amp")
  timeout 200 python3 -m openprompt_retro run --model tiny-bert --tasks SST-2 \
    --methods prompt,retro,demo-text,fine-tune,linear-probe --seeds 42 --max-steps 20 --eval-every 10 \
    --device cuda "${flag[@]}" --no-progress --out "/tmp/gpu-cli-$amp" > "$LOG/cli-$amp.log" 2>&1
  echo "cli amp=$amp rc $?"; grep -E "test accuracy|error|Error" "$LOG/cli-$amp.log" | head -12
  python3 -c "import json,sys; [print(r['method'], r['settings'].get('device'), r['settings'].get('amp'), r['test_accuracy']) for r in map(json.loads, open('/tmp/gpu-cli-$amp/results.jsonl'))]"
done
timeout 200 torchrun --standalone --nproc_per_node 1 benchmarks/scripts/gpu/nccl_check.py nccl > "$LOG/nccl.log" 2>&1
echo "nccl rc $?"; grep -E "backend|ok|Error" "$LOG/nccl.log" | head -8
echo CHECKS-DONE
} > "$LOG/check.log" 2>&1
