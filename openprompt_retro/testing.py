"""Tiny masked LMs built offline from a config, for tests, smoke runs and teaching.

They have random weights, so their predictions mean nothing; they load through
``openprompt.plms.load_plm`` exactly like a real checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional

import torch

WORDS = """the a an and or but not no is was are were be been it this that these those i you he she we they
movie film story plot acting actor actors music scene scenes script director performance characters
good great bad terrible awful wonderful fine best worst boring fun funny dull brilliant excellent poor
love loved hate hated like liked enjoy enjoyed waste nice mess masterpiece beautiful ugly
very really too so quite more most less much many some all any every just still even also only
of in on at to for with by from as about into over after before than then there here what which who
one two three four five time way life world people man woman day year work thing things
what's it's isn't doesn't don't can't won't
question answer sports business science technology world politics money number location entity person
yes maybe neutral positive negative true false sentence same different
""".split()
PUNCT = list(".,!?;:'\"()-")
SENTENCES = [
    "a great movie with a wonderful story .",
    "a terrible film , boring and dull .",
    "the acting was excellent and the music was beautiful .",
    "it was a waste of time , the worst film of the year .",
    "i loved this movie , it was really fun .",
    "the plot is a mess and the actors are poor .",
]


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def write_bert_tokenizer(directory: str, extra_words: Iterable[str] = ()) -> str:
    """A hand-written WordPiece vocabulary (deterministic across versions)."""
    from transformers import BertTokenizer

    os.makedirs(directory, exist_ok=True)
    vocab: List[str] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + PUNCT
    for w in list(WORDS) + list(extra_words):
        if w not in vocab:
            vocab.append(w)
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(os.path.join(directory, "vocab.txt")).save_pretrained(directory)
    return directory


def write_roberta_tokenizer(directory: str) -> str:
    """A byte-level BPE trained on a few sentences, with RoBERTa's special tokens at ids 0-4."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AddedToken, RobertaTokenizer

    os.makedirs(directory, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    corpus = SENTENCES + [" ".join(WORDS)]
    bpe.train_from_iterator(corpus, vocab_size=600, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(directory)
    tok = RobertaTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"),
                           mask_token=AddedToken("<mask>", lstrip=True, rstrip=False))
    tok.save_pretrained(directory)
    return directory


def cache_root() -> str:
    """This user's private folder for the tiny models: ``<tempdir>/openprompt-retro-<uid>``, mode 0700.

    Created if missing; refused with a :class:`PermissionError` if it is not a real folder owned by the
    current user, or if others may write to it (anything they planted there would be loaded as a model).
    """
    import stat
    import tempfile

    root = os.path.join(tempfile.gettempdir(), f"openprompt-retro-{os.getuid()}")
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder (a symlink or a file)"
    elif info.st_uid != os.getuid():
        problem = f"is owned by uid {info.st_uid}, not by you (uid {os.getuid()})"
    elif info.st_mode & 0o022:
        problem = f"is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    else:
        return root
    raise PermissionError(f"the tiny-model cache {root} {problem}; remove it, or point TMPDIR elsewhere")


def tiny_model_dir(name: str) -> str:
    """The cache folder of a tiny model, per transformers version (saved formats differ between versions)."""
    import transformers

    return os.path.join(cache_root(), f"{name}-tf{transformers.__version__}")


def _open_lock(path: str) -> int:
    """Open (create, never truncate) the lock file ``path`` without following a symlink planted there."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if os.path.islink(path):
            raise PermissionError(f"the lock file {path} is a symlink; remove it") from err
        raise


#: the tiny models :func:`ensure_tiny_model` builds and caches
TINY_MODELS = ("tiny-bert", "tiny-roberta", "tiny-clip")


def ensure_tiny_mlm(name: str) -> str:
    """The cached tiny masked LM ``tiny-bert`` / ``tiny-roberta`` (see :func:`ensure_tiny_model`)."""
    if name not in ("tiny-bert", "tiny-roberta"):
        raise ValueError(f"the tiny masked LMs are tiny-bert and tiny-roberta, got {name!r}")
    return ensure_tiny_model(name)


def ensure_tiny_model(name: str) -> str:
    """The cached tiny model ``tiny-bert``, ``tiny-roberta`` or ``tiny-clip``, built once per transformers version.

    Kept in this user's private :func:`cache_root`. Safe for concurrent processes: the first one builds it
    in a temporary folder under a file lock and renames it into place, so nobody sees a half-written model.
    """
    import fcntl
    import shutil
    import tempfile

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose from {TINY_MODELS}")
    kind = name.split("-", 1)[1]
    path = tiny_model_dir(name)
    if os.path.isfile(os.path.join(path, "TINY_MODEL.json")):
        return path
    lock = _open_lock(path + ".lock")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(path, "TINY_MODEL.json")):  # another process may have built it
            tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path))
            try:
                make_tiny_clip(tmp) if kind == "clip" else make_tiny_mlm(kind, tmp)
                if os.path.isdir(path):  # a half-written folder (no TINY_MODEL.json) left by a killed build
                    shutil.rmtree(path)
                os.rename(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    finally:
        os.close(lock)  # closing releases the flock
    return path


def make_tiny_mlm(kind: str, directory: str, seed: int = 0, hidden: int = 32) -> str:
    """Write a tiny ``bert`` or ``roberta`` masked LM (random weights) plus tokenizer to ``directory``."""
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM, AutoTokenizer

    _seed(seed)
    common = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        write_bert_tokenizer(directory)
        tok = AutoTokenizer.from_pretrained(directory)
        config = BertConfig(vocab_size=len(tok), max_position_embeddings=256, **common)
        model = BertForMaskedLM(config)
    elif kind == "roberta":
        write_roberta_tokenizer(directory)
        tok = AutoTokenizer.from_pretrained(directory)
        config = RobertaConfig(vocab_size=len(tok), pad_token_id=1, bos_token_id=0, eos_token_id=2,
                               max_position_embeddings=260, type_vocab_size=1, **common)
        model = RobertaForMaskedLM(config)
    else:
        raise ValueError(f"kind must be 'bert' or 'roberta', got {kind!r}")
    model.save_pretrained(directory)
    with open(os.path.join(directory, "TINY_MODEL.json"), "w") as f:
        json.dump({"kind": kind, "seed": seed, "note": "random weights, for tests only"}, f)
    return directory


def load_tiny_mlm(kind: str, directory: Optional[str] = None, seed: int = 0):
    """Build a tiny model (in ``directory`` or a temp folder) and load it with ``load_plm``."""
    import tempfile

    from . import prompt  # noqa: F401  (makes openprompt importable)
    from openprompt.plms import load_plm

    directory = directory or tempfile.mkdtemp(prefix=f"tiny-{kind}-")
    if not os.path.exists(os.path.join(directory, "config.json")):
        make_tiny_mlm(kind, directory, seed=seed)
    return load_plm(kind, directory)


def _byte_level_chars() -> List[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def make_tiny_clip(directory: str, seed: int = 0, image_size: int = 32) -> str:
    """A tiny random CLIP (transformers ``CLIPModel``) with a character-level CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    os.makedirs(directory, exist_ok=True)
    chars = _byte_level_chars()
    vocab = {}
    for tok in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(tok, len(vocab))
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    _seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(directory)
    with open(os.path.join(directory, "TINY_MODEL.json"), "w") as f:
        json.dump({"kind": "clip", "seed": seed, "note": "random weights, for tests only"}, f)
    return directory
