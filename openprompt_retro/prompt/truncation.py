"""Truncation of RetroTemplate inputs: whatever a plain template fits, a RetroTemplate fits.

OpenPrompt's ``TokenizerWrapper.truncate`` shortens the input's parts in place
while it walks over them, so a part emptied by truncation breaks the keys that
come after ``shortenable_ids`` (``IndexError`` in ``truncate_from_tail``), and
it knows nothing of demonstrations. Inputs wrapped by ``RetroTemplate`` (they
carry ``retro_demo_mask``) are truncated here instead, in this order, until
the input plus the tokenizer's special tokens fits ``max_seq_length``:

1. the demonstrations' shortenable text, longest part first (LM-BFF's rule:
   demonstrations give way before the query);
2. whole demonstrations, the last first (then the separator in front of
   them), as long as cutting the query's text could not make the room while
   keeping at least one of its tokens;
3. the query's shortenable text, by the loader's ``truncate_method`` with
   OpenPrompt's rules ("tail": the last text part first, "head": the first
   part first, "balanced": every part in proportion to its length; a part
   loses tokens at its end);
4. if the query's fixed parts and the special tokens still exceed
   ``max_seq_length``, a ``ValueError`` names the lengths.

So a long query keeps its (short) neural demonstration segment and gives up a
few tokens of text, and an input with no demonstrations left is token for token
what the plain template gives.

Other inputs go to OpenPrompt's own truncation unchanged.
"""
from __future__ import annotations

from typing import Dict, List

from .batch import SEGMENT_KEY, SLOT_KEY


def _flag(parts: List[List[int]], i: int) -> bool:
    return len(parts[i]) > 0 and parts[i][0] == 1


def _query_cuts(lengths: List[int], short: List[int], need: int, method: str) -> Dict[int, int]:
    """Tokens to cut from each shortenable query part (indices ``short``), ``need`` in all."""
    cuts: Dict[int, int] = {}
    if method == "balanced":
        from openprompt.utils import round_list

        total = sum(lengths[i] for i in short)
        shares = [lengths[i] / total * need for i in short]
        round_list(shares, need)
        return {i: int(c) for i, c in zip(short, shares)}
    order = short if method == "head" else short[::-1]
    for i in order:
        if need <= 0:
            break
        cuts[i] = min(lengths[i], need)
        need -= cuts[i]
    return cuts


def _method(wrapper) -> str:
    from openprompt.plms.utils import TokenizerWrapper

    fct = getattr(wrapper, "truncate_fct", None)
    if fct is TokenizerWrapper.truncate_from_head:
        return "head"
    if fct is TokenizerWrapper.balanced_truncate:
        return "balanced"
    return "tail"


def retro_truncate(wrapper, inputs):
    """Truncate one RetroTemplate input (OpenPrompt's part-wise dict) to the wrapper's ``max_seq_length``."""
    ids = inputs["input_ids"]
    n = len(ids)
    lengths = [len(p) for p in ids]
    specials = wrapper.num_special_tokens_to_add
    limit = wrapper.max_seq_length - specials
    wrapper.total_passed_sentences += 1
    excess = sum(lengths) - limit
    if excess <= 0:
        return inputs
    wrapper.num_truncated_sentences += 1
    segment, shortenable = inputs[SEGMENT_KEY], inputs["shortenable_ids"]
    slots = inputs.get(SLOT_KEY, [[]] * n)
    first_demo = next((i for i in range(n) if _flag(segment, i)), n)
    # the separator that closes the query is there only for the demonstrations that follow it
    sep = max((i for i in range(first_demo) if lengths[i]), default=None) if first_demo < n else None
    query_end = n if sep is None else sep
    new = list(lengths)

    def cut(i, k):
        new[i] -= k
        return k

    # 1. demonstration text, longest part first
    demo_text = [i for i in range(query_end + 1, n) if _flag(shortenable, i)]
    while excess > 0 and any(new[i] for i in demo_text):
        excess -= cut(max(demo_text, key=lambda i: (new[i], i)), 1)
    # 2. whole demonstrations, the last first, while the query's text cannot make the room and keep a token
    query_text = [i for i in range(query_end) if _flag(shortenable, i) and lengths[i]]
    query_left = sum(new[i] for i in query_text)
    if sep is not None:
        starts = [i for i in range(query_end + 1, n) if i == query_end + 1 or (slots[i] and slots[i][0] > 0)
                  or (lengths[i] and ids[i] == ids[sep])]  # a demonstration starts at a slot or a separator
        kept = len(starts)
        for start, end in reversed(list(zip(starts, starts[1:] + [n]))):
            if excess <= 0 or excess < query_left:
                break
            for i in range(start, end):
                excess -= cut(i, new[i])
            kept -= 1
        if kept == 0:
            excess -= cut(sep, new[sep])
    # 3. query text, by the loader's truncate_method
    need = min(excess, query_left)
    if need > 0:
        for i, k in _query_cuts(new, query_text, need, _method(wrapper)).items():
            excess -= cut(i, k)
    if excess > 0:
        fixed = sum(new)
        raise ValueError(f"the input cannot fit max_seq_length={wrapper.max_seq_length}: with every shortenable "
                         f"part truncated and no demonstrations, the template's fixed parts still take {fixed} "
                         f"tokens plus {specials} special tokens; raise max_seq_length or shorten the template")
    for key in list(inputs):
        inputs[key] = [part[:k] for part, k in zip(inputs[key], new)]
    return inputs


def patch_truncate() -> None:
    """Route RetroTemplate inputs through :func:`retro_truncate` (idempotent)."""
    from openprompt.plms.utils import TokenizerWrapper

    if getattr(TokenizerWrapper, "_retro_patched", False):
        return
    original = TokenizerWrapper.truncate

    def truncate(self, encoder_inputs):
        if SEGMENT_KEY in encoder_inputs:
            return retro_truncate(self, encoder_inputs)
        return original(self, encoder_inputs)

    truncate.__doc__ = original.__doc__
    TokenizerWrapper.truncate = truncate
    TokenizerWrapper._retro_patched = True

