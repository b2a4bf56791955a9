"""GPU code paths (skipped without CUDA). The rest of the suite pins the CPU; these run what it cannot:
training and prediction on cuda with every neural-demonstration variant, fp16 and bf16 autocast, and the
nccl all-gather with a DDP-wrapped training step (benchmarks/scripts/gpu/check.sh runs them with the CLI checks)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import retro_model, trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("variant", [{}, {"demo_norm": "match"}, {"demo_center": True}, {"demo_dropout": 0.3},
                                     {"demo_warmup": 0.5}])
def test_neural_demonstration_variants_train_on_cuda(tiny_bert, examples, variant):
    model = retro_model(tiny_bert, demonstrations="neural", knn_lambda=0.5, **variant)
    tr = trainer(model, tiny_bert, device="cuda", epochs=2)
    history = tr.fit(examples[:6], examples[6:])
    assert np.isfinite(history[-1]["loss"])
    probs = tr.predict_proba(examples)
    assert probs.shape == (len(examples), 2) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert next(model.parameters()).is_cuda and model.store.keys.dtype == np.float32


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda(tiny_bert, examples, amp):
    model = retro_model(tiny_bert, demonstrations="neural")
    tr = trainer(model, tiny_bert, device="cuda", amp=amp, epochs=2)
    history = tr.fit(examples[:6], examples[6:])
    assert np.isfinite(history[-1]["loss"]) and next(model.parameters()).dtype == torch.float32
    assert tr.predict(examples).shape == (len(examples),)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None and
                    shutil.which("torchrun") is None, reason="torchrun not found")
def test_nccl_gather_and_ddp_step():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "1",
                          os.path.join(ROOT, "benchmarks", "scripts", "gpu", "nccl_check.py"), "nccl"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and "nccl check ok: nccl" in out.stdout, out.stderr[-3000:]
