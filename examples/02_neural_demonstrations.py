"""Retrieval for input: neural demonstrations (one slot per class) and LM-BFF text demonstrations.

    python examples/02_neural_demonstrations.py --model tiny-bert
"""
from _common import parse, setup

from openprompt_retro import RetroConfig, TrainingArgs, build_trainer

ns = parse(__doc__)
spec, data, plm, tok, Wrapper = setup(ns)

for mode in ("neural", "text"):
    trainer = build_trainer(plm, tok, Wrapper, spec.template, spec.label_words, demonstrations=mode,
                            config=RetroConfig(demo_topk=8), text_pool=data["train"],
                            args=TrainingArgs(max_seq_length=256, progress=False))
    model = trainer.model
    loader = trainer.loader(data["test"][:4])
    batch = next(iter(loader)).to(trainer.args.device)  # where the trainer put the model
    ids = batch["input_ids"][0][batch["attention_mask"][0] == 1]
    print(f"\n[{mode}] input the PLM sees:\n  {tok.decode(ids)}")
    if mode == "neural":
        model.refresh_store(trainer.loader(data["train"]), progress=False)
        model.eval()
        prepared = model.prepare_batch(batch)
        demos = prepared["retro_demo_embeds"]
        print(f"  each [UNK] slot's embedding is replaced by d_c: demonstrations {tuple(demos.shape)} (B, C, D)")
        print(f"  |d_c| for the first example: {demos[0].norm(dim=-1).tolist()}")
