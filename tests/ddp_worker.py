"""Trains the tiny model with RetroPrompt; run plain (1 process) or under torchrun (N processes).

    python tests/ddp_worker.py TINY_DIR OUT_DIR
    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py TINY_DIR OUT_DIR
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import openprompt_retro as R  # noqa: E402
from helpers import retro_model  # noqa: E402


def main(tiny_dir, out_dir):
    from openprompt.data_utils import InputExample
    from openprompt.plms import load_plm
    from safetensors.torch import save_file

    from conftest import SENTENCES

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    tiny = load_plm("bert", tiny_dir)
    model = retro_model(tiny, demonstrations="neural", loss="knn", loss_beta=1.0, knn_lambda=0.0)
    examples = [InputExample(guid=f"ex{i}", text_a=t, label=y) for i, (t, y) in enumerate(SENTENCES)]
    args = R.TrainingArgs(epochs=2, batch_size=4, lr=1e-3, shuffle=False, progress=False, tune_inference=False,
                          max_seq_length=64, device="cpu")
    R.RetroTrainer(model, tiny[1], tiny[3], args).fit(examples)
    tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors["__store_keys__"] = torch.from_numpy(model.store.keys.copy())
    save_file(tensors, os.path.join(out_dir, f"world{world}-rank{rank}.safetensors"))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
