"""GPU users, tested on CPU: device plumbing, bf16 autocast, the DDP gather's buffer device, FAISS's GPU mirror.

What needs a real GPU (CUDA execution, fp16 with a live GradScaler, nccl gathers, faiss-gpu) is not run here.
"""
import numpy as np
import pytest
import torch

import openprompt_retro as R
from helpers import retro_model, trainer
from openprompt_retro.prompt import distributed
from openprompt_retro.prompt.training_args import TrainingArgs

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


# ---------------------------------------------------------------------- TrainingArgs.device / amp
def test_device_defaults_to_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TrainingArgs().device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TrainingArgs().device == "cuda"
    assert TrainingArgs(device="cpu").device == "cpu"  # an explicit choice wins
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun: one GPU per process
    assert TrainingArgs().device == "cuda:1"


def test_unknown_or_unavailable_devices_are_clear_errors(monkeypatch):
    from openprompt_retro.prompt.training_args import check_device

    with pytest.raises(ValueError, match=r"TrainingArgs\.device 'gpu': unknown device; use 'cpu', 'cuda'"):
        TrainingArgs(device="gpu")
    with pytest.raises(ValueError, match="unsupported device type"):
        TrainingArgs(device="meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda:1': CUDA is not available here"):
        TrainingArgs(device="cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"only 1 CUDA device\(s\) are visible"):
        check_device("cuda:1")
    assert check_device("cuda:0") == "cuda:0"


def test_amp_is_validated():
    assert TrainingArgs(device="cpu", amp="bf16").amp == "bf16"
    assert TrainingArgs(device="cpu", amp="none").amp is None
    with pytest.raises(ValueError, match=r"amp must be None, 'bf16' or 'fp16', got 'fp32'"):
        TrainingArgs(device="cpu", amp="fp32")
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        TrainingArgs(device="cpu", amp="fp16")
    args = TrainingArgs(device="cpu")
    args.amp = "int8"  # set after construction: the trainer validates again
    with pytest.raises(ValueError, match="amp must be"):
        args.validate()


# ---------------------------------------------------------------------- bf16 autocast on CPU
@pytest.mark.parametrize("demonstrations", ["neural", "none"])
def test_bf16_autocast_trains_and_predicts_float32(tiny_bert, examples, demonstrations):
    model = retro_model(tiny_bert, demonstrations=demonstrations)
    tr = trainer(model, tiny_bert, device="cpu", amp="bf16")
    seen = {"loss": [], "forward": []}
    loss, forward = model.loss, model.forward

    def spy_loss(batch):
        seen["loss"].append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        out = loss(batch)
        return out

    def spy_forward(batch):
        seen["forward"].append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return forward(batch)

    model.loss, model.forward = spy_loss, spy_forward
    history = tr.fit(examples, examples[:4])
    assert seen["loss"] and set(seen["loss"]) == {torch.bfloat16}  # every training step ran under bf16 autocast
    assert set(seen["forward"]) == {torch.bfloat16}
    assert np.isfinite(history[0]["loss"])
    assert model.store.keys.dtype == np.float32 and len(model.store) == len(examples)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}  # not a half model
    probs = tr.predict_proba(examples)
    assert probs.dtype == np.float32 and np.all(np.isfinite(probs))
    assert np.allclose(probs.sum(1), 1.0, atol=2e-2)
    p_plm, queries, _ = tr.collect(examples)
    assert p_plm.dtype == np.float32 and queries.dtype == np.float32
    model.apply_config(knn_lambda=0.5)  # bf16 query keys reach the store (numpy has no bfloat16)
    assert tr.predict_proba(examples[:2]).dtype == np.float32
    assert len(tr.explain(examples[0])["neighbours"]) > 0
    tr.add_examples([type(examples[0])(guid="added", text_a="a fine film", label=1)])
    assert len(model.store) == len(examples) + 1 and model.store.keys.dtype == np.float32


def test_fp16_branch_steps_through_the_grad_scaler(tiny_bert, examples, monkeypatch):
    """The scaler code path runs (on CPU the scaler disables itself; the real fp16 numerics need a GPU)."""
    model = retro_model(tiny_bert)
    tr = trainer(model, tiny_bert, device="cpu", tune_inference=False)
    tr.args.amp = "fp16"  # past validation, which allows fp16 on CUDA only
    calls = []
    scaler_cls = torch.amp.GradScaler

    class SpyScaler(scaler_cls):
        def step(self, optimizer, *a, **k):
            calls.append("step")
            return super().step(optimizer, *a, **k)

    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    if torch.cuda.is_available():
        history = tr.fit(examples)
    else:
        with pytest.warns(UserWarning, match="CUDA is not available"):  # GradScaler('cuda') on a CPU-only torch
            history = tr.fit(examples)
    assert calls and np.isfinite(history[0]["loss"])


# ---------------------------------------------------------------------- DDP gather buffers
class _FakeDist:
    """A one-rank stand-in for torch.distributed that records where collective buffers live."""

    def __init__(self, backend):
        self.backend, self.devices = backend, []

    def get_backend(self, group=None):
        return self.backend

    def get_world_size(self, group=None):
        return 1

    def all_gather(self, outputs, tensor, group=None):
        self.devices += [t.device for t in outputs] + [tensor.device]
        outputs[0].copy_(tensor)


def test_gather_buffers_follow_the_backend(monkeypatch):
    fake = _FakeDist("gloo")
    monkeypatch.setattr(distributed, "dist", fake)
    x = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    assert torch.equal(distributed.all_gather_rows(x), x)
    assert fake.devices and {d.type for d in fake.devices} == {"cpu"}
    fake = _FakeDist("nccl")
    monkeypatch.setattr(distributed, "dist", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.gather_device() == torch.device("cuda", 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch to observe the CUDA allocation")
def test_nccl_gather_allocates_on_the_gpu_not_the_cpu(monkeypatch):
    """Under nccl every buffer goes to the current GPU: on a CPU-only torch that allocation is what fails
    (before, the buffers were CPU tensors, which NCCL cannot use, and this fake gather 'succeeded')."""
    fake = _FakeDist("nccl")
    monkeypatch.setattr(distributed, "dist", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises((AssertionError, RuntimeError), match="(?i)cuda"):
        distributed.all_gather_rows(torch.ones(2, 3))
    assert fake.devices == []  # nothing reached the collective on the CPU


def test_gather_in_order_on_a_single_process_gloo_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert distributed.gather_device() == torch.device("cpu")
        rows = np.arange(12, dtype=np.float32).reshape(4, 3)
        out = distributed.gather_in_order(rows[[2, 0, 3, 1]], np.array([2, 0, 3, 1]))
        assert np.array_equal(out, rows)
        assert distributed.all_gather_rows(torch.zeros(0, 3)).shape == (0, 3)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- FAISS on GPU where installed
def test_flat_store_is_mirrored_on_gpus_when_faiss_sees_them(monkeypatch):
    """faiss-gpu is not installed here: fake one GPU; a built flat store must search through the mirror."""
    import faiss

    mirrors = []

    def to_all_gpus(index):
        mirrors.append(faiss.clone_index(index))
        return mirrors[-1]

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus)
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(20, 8)).astype(np.float32)
    store = R.KnowledgeStore(8, 2)
    assert store.use_gpu
    store.build(keys, np.arange(20) % 2)
    assert store._gpu_index is mirrors[-1] and store._gpu_index.ntotal == 20
    store.add(keys[:3] + 1, [0, 1, 0])
    assert store._gpu_index.ntotal == 23  # later adds reach the mirror too
    q = rng.normal(size=(4, 8)).astype(np.float32)
    cpu = R.KnowledgeStore(8, 2, use_gpu=False)
    cpu.build(np.concatenate([keys, keys[:3] + 1]), np.concatenate([np.arange(20) % 2, [0, 1, 0]]))
    assert np.array_equal(store.search(q, 5).ids, cpu.search(q, 5).ids)

