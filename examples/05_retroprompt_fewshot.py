"""Full RetroPrompt on a few-shot task: neural demonstrations + kNN-guided training + kNN inference,
with lambda, k and T chosen on dev. Compares with plain prompt tuning on the same split.

    python examples/05_retroprompt_fewshot.py --model tiny-bert --epochs 1
    python examples/05_retroprompt_fewshot.py                   # the offline MiniLM, SST-2 seed 42
"""
import time

from _common import limited, load_backbone, parse, setup

from openprompt_retro import RetroConfig, TrainingArgs, build_trainer

ns = parse(__doc__, epochs=dict(type=int, default=20),
           limit=dict(type=int, default=None, help="a seeded, class-stratified sample of N test examples"))
spec, data, _, _, _ = setup(ns)
test = limited(data["test"], ns.limit, ns.seed)
for name in ("prompt", "retro"):
    plm, tok, _, Wrapper = load_backbone(ns.model, ns.model_type)  # a fresh backbone per method
    trainer = build_trainer(plm, tok, Wrapper, spec.template, spec.label_words, method=name,
                            config=RetroConfig(knn_lambda=0.0), args=TrainingArgs(epochs=ns.epochs, seed=ns.seed))
    t0 = time.time()
    trainer.fit(data["train"], data["dev"])
    acc = trainer.evaluate(test)["accuracy"]
    print(f"{name:7s} test accuracy {acc:.4f}  ({time.time() - t0:.0f}s)  tuned: {getattr(trainer, 'tuned', None)}")
    if name == "retro":
        why = trainer.explain(test[0], top=3)
        print(f"  explain {test[0].text_a[:60]!r}: prediction {why['prediction']}, neighbours:")
        for n in why["neighbours"]:
            print(f"    label {n['label']} weight {n['weight']:.2f} {n['text'][:60]!r}")
