"""The saved-run folder: what :meth:`RetroPromptForClassification.save` writes, and checked loading.

A run folder holds::

    run.json                  what the run is (fingerprint, PLM, template, verbalizer, flags) + the sha256
                              of every other file in the folder
    prompt_model.safetensors  every weight of the model (PLM, soft tokens, verbalizer head ...)
    retro_config.json         RetroConfig, including the tuned lambda / k / T
    store/                    the knowledge store (see KnowledgeStore.save)
    key_store/                with a key encoder other than "mask": the store it keyed
    key_encoder.safetensors   adapted keys: the adapted encoder (frozen-mean with save_plm: the frozen copy)
    text_pool.json            text demonstrations only: the labeled pool they are drawn from
    plm/                      with save_plm=True: the PLM and tokenizer (save_pretrained)
    training_args.json        written by RetroTrainer.save
    trainer.json              written by RetroTrainer.save: (lambda, k, T) grid, tuned values, history

A save (:func:`save_run`) writes a complete new folder beside the target and
swaps it in (:func:`~openprompt_retro.core.folders.atomic_folder`): a failed or
killed save leaves the old run loadable. Loading (:func:`read_checked`) reads
run.json and the bytes of every file it lists, checks each against its sha256
(one retry from scratch if a concurrent save swapped the folder meanwhile), and
parses only those bytes - so a load is one checkpoint, never a mix - then
validates fingerprint, config, store, weight names and shapes, and only then
swaps it in (:func:`swap_in`), so a failed load changes nothing.
Nothing is unpickled: JSON, ``.npy`` with ``allow_pickle=False``, safetensors
and FAISS's own index format.
"""
from __future__ import annotations

import contextvars
import hashlib
import json
import os
import re
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch

from ..core.config import RetroConfig
from ..errors import json_loads
from ..core.folders import atomic_folder, sha256_file
from ..core.store import KnowledgeStore
from .key_encoders import weights_sha256

RUN_FILE, WEIGHTS, CONFIG, STORE = "run.json", "prompt_model.safetensors", "retro_config.json", "store"
#: with a key encoder other than "mask": its store, and the key encoder's own weights where the PLM cannot give
#: them back: adapted keys (always, once adapted), frozen-mean keys with save_plm (plm/ holds the trained weights)
#: or taken from a PLM that had been trained before the model was built
KEY_STORE, KEY_ENCODER_WEIGHTS = "key_store", "key_encoder.safetensors"
PLM_DIR, TEXT_POOL, TRAINING_ARGS, TRAINER_FILE = "plm", "text_pool.json", "training_args.json", "trainer.json"
#: 2: run.json's checksums cover every file of the folder (1: the weights and the config only)
RUN_FORMAT, RUN_FORMAT_VERSION = "openprompt-retro run", 2
_READABLE_RUN_FORMATS = (1, 2)
#: files every run has, so every format-2 run.json has their checksums
REQUIRED_FILES = (WEIGHTS, CONFIG) + tuple(f"{STORE}/{n}" for n in ("index.faiss", "keys.npy", "labels.npy",
                                                                   "store.json"))

#: fingerprint field -> how an error message names it
FINGERPRINT_FIELDS = {
    "template_class": "template class",
    "template_text": "template text",
    "label_words": "label words",
    "verbalizer_class": "verbalizer class",
    "verbalizer_label_words": "verbalizer label words",
    "num_classes": "number of classes",
    "demonstrations": "demonstration mode",
    "model_type": "model type",
    "architecture": "PLM architecture",
    "key_type": "key type",
    "key_dim": "key dimension",
    "tokenizer": "tokenizer",
    "vocab_size": "vocabulary size",
    "key_encoder": "key encoder",
}
#: templates / verbalizers that from_pretrained can rebuild from run.json alone
REBUILDABLE_TEMPLATES = ("ManualTemplate", "MixedTemplate", "SoftTemplate")
REBUILDABLE_VERBALIZERS = ("ManualVerbalizer", "SoftVerbalizer")


class SavedRunError(ValueError):
    """A saved run that does not fit the model it is loaded into, or is damaged; nothing was changed."""


# ---------------------------------------------------------------------- template text
def _unparse(parsed: Sequence[Dict]) -> str:
    """A template string that OpenPrompt's ``parse_text`` turns back into ``parsed``."""
    out = []
    for d in parsed:
        d = dict(d)
        prefix = d.pop("add_prefix_space", "")
        if set(d) == {"text"}:
            out.append(prefix + d["text"])
        else:
            out.append(prefix + "{" + ", ".join(f"{json.dumps(k)}: {v!r}" for k, v in d.items()) + "}")
    return "".join(out)


def _without_post_processing(parsed):
    """Parsed template text minus ``post_processing``: OpenPrompt replaces it by a function on first use."""
    return [{k: v for k, v in d.items() if k != "post_processing"} for d in parsed]


def _is_parsed(text) -> bool:
    return isinstance(text, list) and all(isinstance(d, dict) for d in text)


def template_text(base) -> Optional[str]:
    """The text ``base`` was built from, or None when it cannot be recovered exactly."""
    parsed = getattr(base, "text", None)
    raw = base.__dict__.get("_retro_raw_text")
    mixed = type(base).__name__ == "MixedTemplate"  # its parsed text is rewritten by prepare(): trust the raw text
    if raw is not None:
        try:
            if mixed or (_is_parsed(parsed) and _without_post_processing(base.parse_text(raw))
                         == _without_post_processing(parsed)):
                return raw
        except Exception:  # noqa: BLE001 - fall back to the parsed form
            pass
    if _is_parsed(parsed) and not mixed:
        try:
            text = _unparse(_without_post_processing(parsed))
            if _without_post_processing(base.parse_text(text)) == _without_post_processing(parsed):
                return text
        except Exception:  # noqa: BLE001
            pass
    return None


def canonical_template_text(base):
    """The template text in one canonical spelling (from OpenPrompt's parsed form), for comparisons."""
    parsed = getattr(base, "text", None)
    if _is_parsed(parsed):
        return _unparse(_without_post_processing(parsed))
    return _json_safe(parsed)


def _json_safe(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return repr(value)


# ---------------------------------------------------------------------- what a run is
def infer_model_type(plm) -> Optional[str]:
    """OpenPrompt's ``load_plm`` name for this PLM ("bert", "roberta" ...), or None if it is not one of them."""
    try:
        from openprompt.plms import _MODEL_CLASSES
    except ImportError:  # pragma: no cover
        return None
    matches = [name for name, mc in _MODEL_CLASSES.items() if type(plm) is mc.model]
    hf_type = getattr(getattr(plm, "config", None), "model_type", None)
    if hf_type in matches:
        return hf_type
    return matches[0] if len(matches) == 1 else None


def plm_name_or_path(plm) -> Optional[str]:
    path = getattr(getattr(plm, "config", None), "_name_or_path", None) or None
    if path and os.path.isdir(path):
        path = os.path.abspath(path)
    return path


def fingerprint(model) -> Dict[str, Any]:
    """What a run must share with a model to be loaded into it (compared field by field)."""
    template, verbalizer = model.template, model.verbalizer
    base_t, base_v = getattr(template, "base", template), getattr(verbalizer, "base", verbalizer)
    tok = template.tokenizer
    try:
        v_words = _json_safe(base_v.label_words)
    except (AttributeError, RuntimeError):  # a verbalizer without label words
        v_words = None
    return {
        "template_class": type(base_t).__name__,
        "template_text": canonical_template_text(base_t),
        "label_words": list(getattr(template, "label_words", []) or []),
        "verbalizer_class": type(base_v).__name__,
        "verbalizer_label_words": v_words,
        "num_classes": int(model.num_classes),
        "demonstrations": getattr(template, "demonstrations", "none"),
        "model_type": infer_model_type(model.plm),
        "architecture": type(model.plm).__name__,
        "key_type": model.key_head.kind,
        "key_dim": int(model._key_dim()),
        "tokenizer": type(tok).__name__,
        "vocab_size": len(tok),
        "key_encoder": model.key_encoder.identity() if model.key_encoder is not None else "mask",
    }


def differences(saved: Dict, current: Dict) -> List[str]:
    """One line per fingerprint field that differs, e.g. "label words differ: saved [...], model [...]"."""
    out = []
    for field, name in FINGERPRINT_FIELDS.items():
        if field in saved and saved[field] != current.get(field):
            out.append(f"{name} differ{'s' if not name.endswith('words') else ''}: "
                       f"saved {saved[field]!r}, model {current.get(field)!r}")
    return out


def describe_run(model, save_plm: bool, model_type: Optional[str], name_or_path: Optional[str],
                 text_pool_saved: bool) -> Dict[str, Any]:
    """The content of run.json (without the file checksums)."""
    template, verbalizer = model.template, model.verbalizer
    base_t, base_v = getattr(template, "base", template), getattr(verbalizer, "base", verbalizer)
    pm = model.prompt_model
    fp = fingerprint(model)
    from .. import __version__

    return {
        "format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "library_version": __version__,
        "fingerprint": fp,
        "plm": {"model_type": model_type or fp["model_type"],
                "name_or_path": name_or_path or plm_name_or_path(model.plm),
                "saved": bool(save_plm)},
        "template": {"class": type(base_t).__name__, "text": template_text(base_t),
                     "num_tokens": (getattr(base_t, "num_tokens", None)
                                    if type(base_t).__name__ == "SoftTemplate" else None),
                     "placeholder": getattr(template, "placeholder", None),
                     "label_words": fp["label_words"], "demonstrations": fp["demonstrations"],
                     "text_pool": TEXT_POOL if text_pool_saved else None},
        "verbalizer": {"class": type(base_v).__name__, "label_words": fp["verbalizer_label_words"],
                       "prefix": getattr(base_v, "prefix", None),
                       "multi_token_handler": getattr(base_v, "multi_token_handler", None),
                       "post_log_softmax": getattr(base_v, "post_log_softmax", None)},
        "model": {"freeze_plm": bool(getattr(pm, "freeze_plm", False)),
                  "plm_eval_mode": bool(getattr(pm, "plm_eval_mode", False)),
                  "mask_only_head": bool(model.mask_only_head),
                  "exclude_self_in_eval": bool(model.exclude_self_in_eval),
                  "store_loo_p_value": model.lifecycle.loo_p_value},
    }


# ---------------------------------------------------------------------- saving
def _example_record(e) -> Dict:
    return {"guid": e.guid, "text_a": e.text_a, "text_b": e.text_b, "label": e.label, "meta": e.meta or {},
            "tgt_text": e.tgt_text}


def save_text_pool(template, directory: str) -> bool:
    """Write the text-demonstration pool (a PoolDemoRetriever's examples) as JSON; False if there is none to write."""
    from .text_demos import PoolDemoRetriever

    retriever = getattr(template, "text_retriever", None)
    if getattr(template, "demonstrations", None) != "text" or not isinstance(retriever, PoolDemoRetriever):
        return False
    try:
        text = json.dumps([_example_record(e) for e in retriever.pool])
    except (TypeError, ValueError) as e:
        warnings.warn(f"the text-demonstration pool cannot be written as JSON ({e}); from_pretrained will need "
                      "text_pool=...", stacklevel=3)
        return False
    with open(os.path.join(directory, TEXT_POOL), "w", encoding="utf-8") as f:
        f.write(text)
    return True


def run_files(root: str) -> List[str]:
    """Every file under ``root`` but run.json, as sorted '/'-separated relative paths."""
    out = []
    for folder, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(folder, n), root).replace(os.sep, "/")
            if rel != RUN_FILE:
                out.append(rel)
    return sorted(out)


#: the names a run folder's own files and folders have at its top (a file by another name is a user's)
RUN_NAMES = (RUN_FILE, WEIGHTS, CONFIG, STORE, KEY_STORE, KEY_ENCODER_WEIGHTS, PLM_DIR, TEXT_POOL, TRAINING_ARGS,
             TRAINER_FILE)


def _not_the_runs(directory: str, extra_json: Optional[Dict] = None):
    """Whether a file (path relative to the run folder) is not the run's own: not one of :data:`RUN_NAMES`, not
    under one of its folders, not a file the old run.json lists, not one of this save's ``extra_json`` files.
    A re-save keeps such files (notes, predictions) where they were."""
    try:
        with open(os.path.join(directory, RUN_FILE), encoding="utf-8") as f:
            listed = set((json.load(f).get("checksums") or {}).keys())
    except (OSError, ValueError, AttributeError):
        listed = set()
    own = set(RUN_NAMES) | set(extra_json or {})
    return lambda rel: rel.split("/")[0] not in own and rel not in listed


def save_run(model, directory: str, save_plm: bool = False, model_type: Optional[str] = None,
             name_or_path: Optional[str] = None, extra_json: Optional[Dict[str, Dict]] = None) -> None:
    """Weights, config, store, optional PLM/tokenizer, text pool and ``extra_json`` files (name -> object),
    then run.json with the sha256 of every one of them - all in a new folder swapped in at the end
    (:func:`~openprompt_retro.core.folders.atomic_folder`: it replaces an existing run folder, or an empty one).
    Files in the folder that are not the run's (a user's notes, predictions) are kept, unlisted in run.json."""
    from safetensors.torch import save_model

    with atomic_folder(directory, markers=(RUN_FILE, WEIGHTS), carry=_not_the_runs(directory, extra_json)) as tmp:
        with model.store_outside_state_dict():  # the store has its own folder
            save_model(model, os.path.join(tmp, WEIGHTS))
        model.config.save(os.path.join(tmp, CONFIG))
        model.store.save(os.path.join(tmp, STORE))
        if model.lifecycle.key_store is not None:
            model.lifecycle.key_store.save(os.path.join(tmp, KEY_STORE))
        if save_plm:
            model.plm.save_pretrained(os.path.join(tmp, PLM_DIR))
            model.template.tokenizer.save_pretrained(os.path.join(tmp, PLM_DIR))
        adapted = getattr(model.key_encoder, "adapted", False)
        trained_copy = bool(getattr(model.key_encoder, "trained_copy", False))  # not the checkpoint's weights
        if adapted or (model.config.key_encoder == "frozen-mean" and (save_plm or trained_copy)):
            from safetensors.torch import save_file  # plm/ (or the hub) holds other weights than these

            save_file({k: v.detach().cpu().contiguous() for k, v in model.key_encoder.model.state_dict().items()},
                      os.path.join(tmp, KEY_ENCODER_WEIGHTS))
        pool_saved = save_text_pool(model.template, tmp)
        for name, value in (extra_json or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(value, f, indent=2)
        run = describe_run(model, save_plm, model_type, name_or_path, pool_saved)
        run["checksums"] = {name: sha256_file(os.path.join(tmp, name)) for name in run_files(tmp)}
        with open(os.path.join(tmp, RUN_FILE), "w", encoding="utf-8") as f:
            json.dump(run, f, indent=2)


# ---------------------------------------------------------------------- loading
class Loaded(NamedTuple):
    """Everything a load swaps in, read and validated."""

    config: RetroConfig
    store: KnowledgeStore
    tensors: Dict[str, torch.Tensor]
    key_store: Optional[KnowledgeStore] = None
    key_encoder_state: Optional[Dict[str, torch.Tensor]] = None  # adapted keys: the adapted weights
    loo_p_value: Optional[float] = None  # the store's leave-one-out p-value (the untuned mixture's guard)


class Snapshot(NamedTuple):
    """One checkpoint of a run folder, read once: run.json and the bytes of its files, checked against it.

    ``files`` holds every file but those under plm/ (read later by ``from_pretrained``
    of transformers; their checksums were verified when the snapshot was taken).
    """

    directory: str
    run: Dict
    files: Dict[str, bytes]

    def read(self, name: str) -> Optional[bytes]:
        """The bytes of file ``name`` ('/'-separated), or None when the run has no such file."""
        return self.files.get(name)


_SHA256 = re.compile(r"[0-9a-f]{64}")
#: the snapshot that loads of a folder use while :func:`pinned` holds it (per thread / task)
_PINNED: contextvars.ContextVar = contextvars.ContextVar("openprompt_retro_pinned_run", default=None)


def _no_run_json(directory: str) -> SavedRunError:
    present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    return SavedRunError(
        f"{directory!r} is not a complete saved RetroPrompt run: it has no {RUN_FILE} (it holds {present[:8]}). "
        f"{RUN_FILE} records what the run is (template, label words, PLM) and a checksum of every file; without "
        "it nothing can be checked, so nothing is loaded. A folder written before run.json existed must be loaded "
        "by the version that wrote it and saved again with this one")


def _parse_run_json(directory: str, data: bytes) -> Dict:
    """run.json's bytes, validated as a RetroPrompt run."""
    try:
        run = json_loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SavedRunError(f"corrupt {RUN_FILE} in {directory!r}: {e}") from None
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        got = run.get("format") if isinstance(run, dict) else type(run).__name__
        raise SavedRunError(f"{RUN_FILE} in {directory!r} does not describe a RetroPrompt run (format {got!r}, "
                            f"expected {RUN_FORMAT!r})")
    if run.get("format_version") not in _READABLE_RUN_FORMATS:
        raise SavedRunError(f"{RUN_FILE} in {directory!r} has format version {run.get('format_version')!r}; this "
                            f"version reads {list(_READABLE_RUN_FORMATS)}")
    for key in ("fingerprint", "plm", "template", "verbalizer", "model", "checksums"):
        if not isinstance(run.get(key), dict):
            raise SavedRunError(f"corrupt {RUN_FILE} in {directory!r}: field {key!r} is missing or not an object")
    missing = [f for f in FINGERPRINT_FIELDS if f not in run["fingerprint"]]
    if missing:
        raise SavedRunError(f"corrupt {RUN_FILE} in {directory!r}: the fingerprint lacks {missing}")
    for name, digest in run["checksums"].items():
        parts = name.split("/")
        if (not isinstance(digest, str) or not _SHA256.fullmatch(digest) or name.startswith("/")
                or any(p in ("", ".", "..") for p in parts) or name == RUN_FILE):
            raise SavedRunError(f"corrupt {RUN_FILE} in {directory!r}: bad checksum entry {name!r}: {digest!r}")
    unlisted = [n for n in REQUIRED_FILES if n not in run["checksums"]] if run["format_version"] >= 2 else []
    if unlisted:
        raise SavedRunError(f"corrupt {RUN_FILE} in {directory!r}: it has no checksum of {unlisted}")
    return run


def read_run_json(directory: str, required: bool = False) -> Optional[Dict]:
    """run.json, validated as a RetroPrompt run (the pinned snapshot's, see :func:`pinned`); None if absent
    and not ``required``."""
    pin = _pinned_for(directory)
    if pin is not None:
        return pin.run
    path = os.path.join(directory, RUN_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if required:
            raise _no_run_json(directory) from None
        return None
    return _parse_run_json(directory, data)


class _Changed(Exception):
    """A file does not match run.json's checksum (a concurrent save, or damage); carries the message."""


def _read_once(directory: str) -> Snapshot:
    try:
        with open(os.path.join(directory, RUN_FILE), "rb") as f:
            run = _parse_run_json(directory, f.read())
    except FileNotFoundError:
        raise _no_run_json(directory) from None
    sums = run["checksums"]
    if run["format_version"] < 2:
        warnings.warn(f"{RUN_FILE} in {directory!r} (format 1) has checksums of {sorted(sums)} only: the store and "
                      "the other files cannot be checked; save the run again to cover every file", stacklevel=4)
        names = sorted(set(run_files(directory)) | set(sums))
    else:
        names = sorted(sums)
    files = {}
    for name in names:
        path = os.path.join(directory, *name.split("/"))
        try:
            if name.startswith(PLM_DIR + "/"):
                got = sha256_file(path)
            else:
                with open(path, "rb") as f:
                    files[name] = f.read()
                got = hashlib.sha256(files[name]).hexdigest()
        except FileNotFoundError:
            raise _Changed(f"missing {path}, which {RUN_FILE} lists: the run is incomplete") from None
        if name in sums and got != sums[name]:
            raise _Changed(f"corrupt {path}: its sha256 does not match the checksum in {RUN_FILE} (the file was "
                           "damaged or replaced after saving, e.g. by the file of another run)")
    return Snapshot(directory, run, files)


def read_snapshot(directory: str) -> Snapshot:
    """One checkpoint of the run at ``directory`` (the pinned one, see :func:`pinned`), every file checked.

    A file that does not match the run.json read with it is read again from
    scratch once (a concurrent save swapped the folder in between); a second
    mismatch is a :class:`SavedRunError` naming the file.
    """
    pin = _pinned_for(directory)
    if pin is not None:
        return pin
    check_files(directory)
    try:
        return _read_once(directory)
    except _Changed:  # a save may have swapped the folder in between: read it again from scratch
        try:
            return _read_once(directory)
        except _Changed as e:
            raise SavedRunError(f"{e}; nothing was loaded") from None


def _pinned_for(directory: str) -> Optional[Snapshot]:
    pin = _PINNED.get()
    if pin is not None and os.path.realpath(pin.directory) == os.path.realpath(directory):
        return pin
    return None


@contextmanager
def pinned(directory: str) -> Iterator[Snapshot]:
    """Within the block, every read of the run at ``directory`` (run.json, the model, the trainer files)
    comes from one snapshot: a rebuild from several reads is one checkpoint even while the run is re-saved.
    Nested blocks for the same run share the outer block's snapshot."""
    outer = _pinned_for(directory)
    if outer is not None:
        yield outer
        return
    token = _PINNED.set(read_snapshot(directory))
    try:
        yield _PINNED.get()
    finally:
        _PINNED.reset(token)


def read_json_file(directory: str, name: str) -> Optional[Any]:
    """The JSON value of the run's file ``name`` (checked against run.json), None when the run has none."""
    data = read_snapshot(directory).read(name)
    if data is None:
        return None
    try:
        return json_loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SavedRunError(f"corrupt {os.path.join(directory, name)}: {e}") from None


def check_files(directory: str) -> None:
    """Every part a load needs is there - before anything is read."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no saved RetroPrompt model at {directory!r}: the folder does not exist")
    missing = [n for n in (WEIGHTS, CONFIG) if not os.path.isfile(os.path.join(directory, n))]
    if not os.path.isdir(os.path.join(directory, STORE)):
        missing.append(STORE + "/")
    if missing:
        raise FileNotFoundError(f"no saved RetroPrompt model at {directory!r}: missing {', '.join(missing)}; "
                                "nothing was loaded")


def _shared_with(state: Dict[str, torch.Tensor]) -> Dict[str, List[str]]:
    """name -> the other names whose tensor shares its storage (tied weights; safetensors saves one of them)."""
    by_storage: Dict[Any, List[str]] = {}
    for name, t in state.items():
        if t.numel():
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
    return {n: [m for m in names if m != n] for names in by_storage.values() for n in names}


def _check_weights(model, path: str, tensors: Dict[str, torch.Tensor]) -> None:
    with model.store_outside_state_dict():
        state = model.state_dict()
    shared = _shared_with(state)
    unexpected = sorted(set(tensors) - set(state))
    missing = sorted(n for n in set(state) - set(tensors) if not any(m in tensors for m in shared.get(n, [])))
    wrong = sorted(f"{n}: saved {tuple(tensors[n].shape)}, model {tuple(state[n].shape)}"
                   for n in set(tensors) & set(state) if tuple(tensors[n].shape) != tuple(state[n].shape))
    if unexpected or missing or wrong:
        def some(names):
            return f"{names[:8]}{f' and {len(names) - 8} more' if len(names) > 8 else ''}"

        parts = [f"{len(missing)} missing: {some(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {some(unexpected)}" if unexpected else "",
                 f"{len(wrong)} with another shape: {some(wrong)}" if wrong else ""]
        raise SavedRunError(f"{path} does not match this model's weights ({'; '.join(p for p in parts if p)}); "
                            "nothing was loaded")


def read_checked(model, directory: str) -> Loaded:
    """Read and validate a saved run for ``model`` without changing anything (one :func:`read_snapshot`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    from ..core.store import StoreError

    snap = read_snapshot(directory)
    diffs = differences(snap.run["fingerprint"], fingerprint(model))
    if diffs:
        raise SavedRunError(f"the run saved at {directory!r} does not fit this model ({len(diffs)} "
                            f"difference{'s' if len(diffs) > 1 else ''} with its {RUN_FILE}): "
                            + "; ".join(diffs) + ". Nothing was loaded: build the model as the run was built, "
                            "or rebuild it from the folder with from_pretrained(dir)")
    config_path = os.path.join(directory, CONFIG)
    try:
        config = RetroConfig.from_dict(json_loads(snap.read(CONFIG).decode("utf-8")))
    except (ValueError, TypeError, AttributeError) as e:
        raise SavedRunError(f"corrupt {config_path}: {e}; nothing was loaded") from None
    store_files = {name[len(STORE) + 1:]: data for name, data in snap.files.items() if name.startswith(STORE + "/")}
    try:
        store = KnowledgeStore.load(os.path.join(directory, STORE), expected_dim=model._key_dim(),
                                    expected_built_by={"key_type": model.key_head.kind}, files=store_files)
    except StoreError as e:
        raise StoreError(f"{e}; nothing was loaded") from None
    if store.num_classes != model.num_classes:
        raise SavedRunError(f"the store in {os.path.join(directory, STORE)!r} has {store.num_classes} classes, this "
                            f"model has {model.num_classes}; nothing was loaded")
    if config.key_encoder != model.config.key_encoder:
        raise SavedRunError(f"the run at {directory!r} was saved with key_encoder={config.key_encoder!r}, this model "
                            f"has {model.config.key_encoder!r}; nothing was loaded")
    # a sentence encoder is known by its weights (checked with the key store), not by where it was loaded from
    config.key_encoder_path = model.config.key_encoder_path
    encoder_state = _read_adapted_encoder(model, directory, snap)
    key_store = _read_key_store(model, directory, snap, config, encoder_state)
    if key_store is not None and len(store) and (len(store) != len(key_store)
                                                 or not (store.labels == key_store.labels).all()):
        raise SavedRunError(f"the run at {directory!r} has a [MASK] store of {len(store)} entries and a key store of "
                            f"{len(key_store)} whose entries do not match one for one (a run saved in format 1, "
                            "before every file had a checksum, and changed since?); nothing was loaded")
    path = os.path.join(directory, WEIGHTS)
    try:
        tensors = load_tensors(snap.read(WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise SavedRunError(f"corrupt {path}: {e}; nothing was loaded") from None
    _check_weights(model, path, tensors)
    p = (snap.run.get("model") or {}).get("store_loo_p_value")
    loo = float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0 else None
    return Loaded(config, store, tensors, key_store, encoder_state, loo)


def _read_adapted_encoder(model, directory: str, snap) -> Optional[Dict[str, torch.Tensor]]:
    """An adapted key encoder's saved weights (None: the model's key encoder is not adapted, or the run was saved
    before adapting), checked against the encoder's names and shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    if getattr(model.key_encoder, "kind", None) != "adapted":
        return None
    data = snap.read(KEY_ENCODER_WEIGHTS)
    if data is None:
        return None
    path = os.path.join(directory, KEY_ENCODER_WEIGHTS)
    try:
        state = load_tensors(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise SavedRunError(f"corrupt {path}: {e}; nothing was loaded") from None
    own = model.key_encoder.model.state_dict()
    wrong = sorted(set(own) ^ set(state)) + sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if wrong:
        raise SavedRunError(f"{path} does not fit this model's key encoder ({len(wrong)} weights differ in name or "
                            f"shape, e.g. {wrong[:3]}); nothing was loaded")
    return state


def _read_key_store(model, directory: str, snap, config: RetroConfig,
                    encoder_state: Optional[Dict[str, torch.Tensor]] = None) -> Optional[KnowledgeStore]:
    """The saved key store (None for key_encoder="mask"), checked against the model's key encoder as the run
    had it: the saved config's pair keys, and the saved adapted weights where there are some."""
    from ..core.store import StoreError

    encoder = model.key_encoder
    if encoder is None:
        return None
    files = {name[len(KEY_STORE) + 1:]: data for name, data in snap.files.items()
             if name.startswith(KEY_STORE + "/")}
    expected = encoder.identity()
    relation = config.pair_keys == "relation"
    expected["dim"] = 2 * encoder.hidden_size + 1 if relation else encoder.hidden_size
    if relation:
        expected["pairs"] = "relation"
    if encoder.kind == "adapted":
        expected["weights_sha256"] = weights_sha256(encoder_state) if encoder_state is not None \
            else encoder.fingerprint()
    try:
        store = KnowledgeStore.load(os.path.join(directory, KEY_STORE), expected_dim=expected["dim"],
                                    expected_built_by=expected, files=files)
    except StoreError as e:
        raise StoreError(f"{e}; nothing was loaded") from None
    if store.num_classes != model.num_classes:
        raise SavedRunError(f"the key store in {os.path.join(directory, KEY_STORE)!r} has {store.num_classes} "
                            f"classes, this model has {model.num_classes}; nothing was loaded")
    return store


def swap_in(model, loaded: Loaded) -> None:
    """Put validated parts in place (names and shapes were checked: this cannot fail half-way)."""
    model.load_state_dict(loaded.tensors, strict=False)
    model.config = loaded.config
    if model.key_encoder is not None:
        model.key_encoder.relation = loaded.config.pair_keys == "relation"
    if loaded.key_encoder_state is not None:
        adaptation = (loaded.key_store.built_by.get("adaptation") if loaded.key_store is not None else None)
        model.key_encoder.restore(loaded.key_encoder_state, adaptation)
    if model.key_encoder is not None:
        model.lifecycle.forget_keys()
    if loaded.key_store is not None:
        model.lifecycle.key_store = loaded.key_store
    model.store = loaded.store
    model.lifecycle.loo_p_value = loaded.loo_p_value
    model.apply_config()


def saved_max_seq_length(directory: str) -> Optional[int]:
    """The max length the run was trained with (training_args.json, written by RetroTrainer.save), or None."""
    try:
        with open(os.path.join(directory, TRAINING_ARGS), encoding="utf-8") as f:
            value = json.load(f).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None
