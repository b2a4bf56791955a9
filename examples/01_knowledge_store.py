"""The knowledge store: keys = <mask> representations of the training set, values = labels.

    python examples/01_knowledge_store.py --model tiny-bert
"""
import tempfile

from _common import parse, setup
from openprompt import PromptDataLoader, PromptForClassification
from openprompt.prompts import ManualTemplate, ManualVerbalizer

from openprompt_retro import KnowledgeStore, build_store

ns = parse(__doc__)
spec, data, plm, tok, Wrapper = setup(ns)
template = ManualTemplate(tokenizer=tok, text=spec.template)
verbalizer = ManualVerbalizer(tok, num_classes=spec.num_classes, label_words=[[w] for w in spec.label_words])
model = PromptForClassification(plm, template, verbalizer)
train = PromptDataLoader(data["train"], template, tokenizer=tok, tokenizer_wrapper_class=Wrapper,
                         max_seq_length=128, batch_size=16)

store = build_store(model, train)  # one forward pass over the training set
print(store)

# leave-one-out search: each training example's nearest *other* entries
res = store.search(store.keys[:3], k=3, exclude_ids=[0, 1, 2])
for i in range(3):
    print(f"\n{store.texts[i]!r} (label {store.labels[i]})")
    for j, s in zip(res.ids[i], res.scores[i]):
        print(f"   {s:8.2f}  label {store.labels[j]}  {store.texts[j][:70]!r}")

print("\np_kNN of the first 3 entries (self excluded, k=8, T=10):")
print(store.knn_distribution(store.keys[:3], k=8, temperature=10.0, exclude_ids=[0, 1, 2]).round(3))

with tempfile.TemporaryDirectory() as d:
    store.save(d)  # FAISS index + npz + JSON, no pickle
    again = KnowledgeStore.load(d, expected_dim=store.dim)
    assert (again.search(store.keys[:3], 3).ids == store.search(store.keys[:3], 3).ids).all()
    print(f"\nsaved and reloaded from {d}: identical search results")
