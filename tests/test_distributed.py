import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")


def _run(cmd, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=os.path.dirname(HERE))
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_two_process_ddp_matches_single_process(tiny_dirs, tmp_path):
    worker = os.path.join(HERE, "ddp_worker.py")
    _run([sys.executable, worker, tiny_dirs["bert"], str(tmp_path)])
    _run([TORCHRUN, "--standalone", "--nproc_per_node", "2", worker, tiny_dirs["bert"], str(tmp_path)])
    single = load_file(str(tmp_path / "world1-rank0.safetensors"))
    ranks = [load_file(str(tmp_path / f"world2-rank{r}.safetensors")) for r in (0, 1)]
    # every rank holds the same store, built from all-gathered keys
    assert torch.equal(ranks[0]["__store_keys__"], ranks[1]["__store_keys__"])
    assert torch.allclose(ranks[0]["__store_keys__"], single["__store_keys__"], atol=1e-5)
    # the trained parameters match a single process on the same global batches
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], value, atol=2e-5), name
    # ... and training did move them (the comparison is not between two untouched models)
    from openprompt.plms import load_plm

    from helpers import retro_model

    torch.manual_seed(0)
    initial = dict(retro_model(load_plm("bert", tiny_dirs["bert"])).named_parameters())
    moved = [n for n in initial if (single[n] - initial[n].detach()).abs().max() > 1e-4]
    assert len(moved) > 10


def test_ddp_wrapper_never_lets_ddp_rebuild_the_batch(monkeypatch):
    """With device_ids, DDP moves inputs by rebuilding each dict as type(obj)(pairs); OpenPrompt's InputFeatures
    takes keywords, so the batch came out empty (seen on a GPU under nccl). wrap_ddp gives no device_ids:
    the trainer has already moved the batch."""
    from openprompt.data_utils import InputFeatures
    from torch.distributed.utils import _to_kwargs

    from openprompt_retro.prompt import distributed

    batch = InputFeatures(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3, dtype=torch.long))
    moved = _to_kwargs((batch,), {}, torch.device("cpu"), False)[0][0][0]
    assert moved["attention_mask"] is None  # what DDP's input moving does to the batch
    seen = {}

    class RecordingDDP(torch.nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            seen.update(kwargs)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", RecordingDDP)
    distributed.wrap_ddp(torch.nn.Linear(2, 2))
    assert "device_ids" in seen and seen["device_ids"] is None
