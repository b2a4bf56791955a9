"""Shared builders for the RetroPrompt tests (tiny models, tiny data)."""
import openprompt_retro as R

WORDS = ["terrible", "great"]
#: the [MASK]-key store with top-k voting (the default before issue 20): tests of its mechanics name it
MASK = {"key_encoder": "mask", "knn_readout": "topk"}
TEXT = '{"placeholder":"text_a"} it was {"mask"} .'
#: the random tiny models' stores are at chance, and the guard (store_guard_alpha) would keep them out of every
#: mixture: tests of the mixture's mechanics turn it off; tests of the guard set it
NO_GUARD = {"store_guard_alpha": None}


def base_template(kind, plm, tok):
    from openprompt.prompts import ManualTemplate, MixedTemplate, SoftTemplate

    if kind == "manual":
        return ManualTemplate(tokenizer=tok, text=TEXT)
    if kind == "mixed":
        return MixedTemplate(model=plm, tokenizer=tok, text='{"placeholder":"text_a"} {"soft":"it"} was {"mask"} .')
    if kind == "soft":
        return SoftTemplate(model=plm, tokenizer=tok, text=TEXT, num_tokens=3)
    raise ValueError(kind)


def base_verbalizer(kind, plm, tok):
    from openprompt.prompts import ManualVerbalizer, SoftVerbalizer

    if kind == "manual":
        return ManualVerbalizer(tok, num_classes=2, label_words=[[w] for w in WORDS])
    return SoftVerbalizer(tok, plm, num_classes=2, label_words=[[w] for w in WORDS])


def retro_model(tiny, template="manual", verbalizer="manual", demonstrations="neural", pool=None, **config):
    plm, tok, _, wrapper = tiny
    t = R.RetroTemplate(base_template(template, plm, tok), WORDS, demonstrations=demonstrations, plm=plm,
                        text_pool=pool)
    cfg = R.RetroConfig(**{"demo_topk": 2, "knn_k": 3, "train_knn_k": 3, **MASK, **NO_GUARD, **config})
    return R.RetroPromptForClassification(plm, t, base_verbalizer(verbalizer, plm, tok), config=cfg)


def trainer(model, tiny, **args):
    _, tok, _, wrapper = tiny
    defaults = dict(epochs=1, batch_size=4, progress=False, max_seq_length=64, device="cpu")  # CPU math, also on GPU hosts
    grid = R.MixtureGrid(ks=args.pop("ks", (2, 3)), temperatures=args.pop("temperatures", (1.0,)))
    return R.RetroTrainer(model, tok, wrapper, R.TrainingArgs(**{**defaults, **args}), grid)


def first_batch(tr, examples, n=None):
    loader = tr.loader(examples[:n] if n else examples, batch_size=len(examples))
    return loader, next(iter(loader))
