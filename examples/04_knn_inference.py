"""Retrieval for inference with OpenPrompt's own PromptForClassification:

    P(y|x) = lambda * p_kNN(y|x) + (1 - lambda) * p_PLM(y|x)

    python examples/04_knn_inference.py --model tiny-bert
"""
import numpy as np
import torch
from _common import limited, parse, setup
from openprompt import PromptDataLoader, PromptForClassification
from openprompt.prompts import ManualTemplate, ManualVerbalizer

from openprompt_retro import KnnVerbalizer, build_store

ns = parse(__doc__, limit=dict(type=int, default=200, help="test examples to score (a seeded, class-stratified sample)"))
spec, data, plm, tok, Wrapper = setup(ns)
template = ManualTemplate(tokenizer=tok, text=spec.template)
base = ManualVerbalizer(tok, num_classes=spec.num_classes, label_words=[[w] for w in spec.label_words])
verbalizer = KnnVerbalizer(base, plm, k=16, temperature=10.0, lam=0.0)
model = PromptForClassification(plm, template, verbalizer).eval()  # unchanged OpenPrompt class


def loader(examples):
    return PromptDataLoader(examples, template, tokenizer=tok, tokenizer_wrapper_class=Wrapper,
                            max_seq_length=128, batch_size=32)


verbalizer.store = build_store(model, loader(data["train"]))
test = limited(data["test"], ns.limit, ns.seed)
labels = np.array([e.label for e in test])
test_loader = loader(test)
print("lambda  test accuracy (zero-shot backbone; lambda is for illustration - choose it on dev)")
for lam in (0.0, 0.25, 0.5, 0.75, 1.0):
    verbalizer.lam = lam
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(-1) for b in test_loader]).numpy()
    print(f"{lam:6.2f}  {(pred == labels).mean():.3f}")
