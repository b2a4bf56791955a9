"""Retrieval for training: the kNN-guided loss weights hard examples more.

    w_i = min(1 + beta * (-log p_kNN(y_i | x_i)), max_loss_weight)   (own entry excluded; p_kNN has no gradient)

p_kNN is read from the store kNN uses (by default keyed by a frozen copy of the pre-trained encoder, read
by class means), so the weights stay informative through training.

    python examples/03_knn_guided_training.py --model tiny-bert
"""
import torch
from _common import parse, setup

from openprompt_retro import RetroConfig, TrainingArgs, build_trainer

ns = parse(__doc__, epochs=dict(type=int, default=3))
spec, data, plm, tok, Wrapper = setup(ns)
trainer = build_trainer(plm, tok, Wrapper, spec.template, spec.label_words, demonstrations="none",
                        config=RetroConfig(loss="knn", loss_beta=1.0, knn_lambda=0),
                        args=TrainingArgs(epochs=ns.epochs, lr=5e-5, tune_inference=False))
model = trainer.model

train_loader = trainer.loader(data["train"])
model.refresh_store(train_loader, progress=False)
s = model.lifecycle.loss_store
w, p_gold = model.training_loss_weights()  # what training uses: the cap, the gate, the training read-out
print(f"the loss weights are capped at {model.config.max_loss_weight}; the gate is "
      f"{'on' if model.knn_loss_active else 'off (weights 1)'}")
print("hardest training examples for the store (highest loss weight):")
for i in torch.argsort(w, descending=True)[:5].tolist():
    print(f"  w={w[i]:.2f}  p_kNN(gold)={p_gold[i]:.3f}  label {s.labels[i]}  {s.texts[i][:70]!r}")

history = trainer.fit(data["train"], data["dev"])
print("\nepoch  loss   dev accuracy")
for h in history:
    print(f"{h['epoch']:5d}  {h['loss']:.3f}  {h['dev_accuracy']:.3f}")
