"""The torch.distributed paths on one GPU with nccl (a 1-process group: NCCL refuses two ranks on one GPU).

    torchrun --standalone --nproc_per_node 1 benchmarks/scripts/gpu/nccl_check.py [nccl|gloo]

Checks that the store's all-gather allocates its buffers where the backend needs them and returns rows in
global order, and that a DDP-wrapped RetroPrompt model takes a kNN-guided training step on the GPU.
"""
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests"))

import openprompt_retro as R  # noqa: E402,F401  (applies the OpenPrompt shims)
from openprompt_retro.prompt import distributed  # noqa: E402


def main(backend: str) -> None:
    dist.init_process_group(backend)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    print("backend", dist.get_backend(), "gather device", distributed.gather_device())
    rows = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    gathered = distributed.all_gather_rows(rows)
    assert gathered.device == rows.device and torch.equal(gathered, rows), gathered
    ordered = distributed.gather_in_order(rows.numpy()[::-1].copy(), np.array([3, 2, 1, 0]))
    assert np.array_equal(ordered, rows.numpy()), ordered

    from openprompt.data_utils import InputExample
    from openprompt.plms import load_plm

    from conftest import SENTENCES
    from helpers import retro_model
    from openprompt_retro.testing import ensure_tiny_model

    torch.manual_seed(0)
    tiny = load_plm("bert", ensure_tiny_model("tiny-bert"))
    model = retro_model(tiny, demonstrations="neural", loss="knn", loss_beta=1.0, knn_lambda=0.0)
    examples = [InputExample(guid=f"ex{i}", text_a=t, label=y) for i, (t, y) in enumerate(SENTENCES)]
    args = R.TrainingArgs(epochs=1, batch_size=4, lr=1e-3, progress=False, tune_inference=False, max_seq_length=64,
                          device=str(device))
    trainer = R.RetroTrainer(model, tiny[1], tiny[3], args)
    trainer.fit(examples)  # store refresh and training on the device
    ddp = distributed.wrap_ddp(model)
    loader = trainer.loader(examples, batch_size=4)
    model.attach(loader)  # a training batch of a known loader: the store is built from it
    batch = next(iter(loader)).to(str(device))
    model.train()
    loss = ddp(batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    print("nccl check ok:", backend, "loss", float(loss), "params with grad", len(grads), "on", grads[0].device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nccl")
