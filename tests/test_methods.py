"""The method presets: one import-free registry, read by the factory and the CLI."""
import subprocess
import sys

import numpy as np
import pytest

from openprompt_retro.methods import METHODS

WORDS = ["terrible", "great"]
TEXT = '{"placeholder":"text_a"} it was {"mask"} .'


def test_the_registry_imports_no_framework_and_both_readers_share_it():
    code = ("import sys, openprompt_retro.methods as m; heavy = [x for x in ('torch', 'openprompt', 'transformers') "
            "if x in sys.modules]; print(heavy, sorted(m.METHODS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("[] ['demo-text', 'prompt', 'retro'"), out.stderr[-2000:]
    from openprompt_retro.experiments.methods import METHOD_HELP, TRAINED_METHODS
    from openprompt_retro.prompt import factory

    assert factory.METHODS is METHODS and TRAINED_METHODS == list(METHODS)
    assert METHOD_HELP == {name: p.help for name, p in METHODS.items()}


@pytest.mark.parametrize("method", [m for m, p in METHODS.items() if not p.knn_inference])
def test_a_preset_without_knn_inference_predicts_the_plms_distribution(tiny_bert, examples, method):
    """Before: prompt, demo-text and retro-no-knn-infer kept lambda 0.5 and mixed p_kNN in at inference."""
    from openprompt_retro import TrainingArgs, build_trainer

    plm, tok, _, wrapper = tiny_bert
    trainer = build_trainer(plm, tok, wrapper, TEXT, WORDS, method=method, text_pool=examples,
                            args=TrainingArgs(max_steps=2, batch_size=4, progress=False, device="cpu",
                                              max_seq_length=64))
    trainer.fit(examples, examples)
    assert trainer.model.config.knn_lambda == 0.0 and not trainer.args.tune_inference
    trainer.model.refresh_store(trainer.loader(examples), progress=False)  # a store is there: still not used
    p_plm, _, _ = trainer.collect(examples)
    np.testing.assert_allclose(trainer.predict_proba(examples), p_plm, atol=1e-6)
