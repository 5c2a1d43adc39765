"""V3 object masks (spec §6): where in each preference image the model itself looks when it reads the object words.

For every ok pair, the chosen and the rejected image are each run once through the training sequence
[gen prompt of the short base prompt x_c] ++ [their N image-token embeddings] with eager attention and no grad.
For each object word of the item (the structured `objects` column of the prompts table; no external tagger):

1. its span: the gen-prompt tokens that stand for it in x_c (`object_spans`);
2. its map: the attention of the N image positions to the span keys, averaged over heads and over the middle
   layers (`layer_skip` first and last layers dropped), then over the span tokens -> N values;
3. its binary mask: min-max normalise the map, keep the cells above `otsu_scale` x Otsu's threshold.

The image's mask is the OR over the objects, stored as grid*grid float32 0/1 values in raster order (the order of
the image tokens). Rows in = ok pairs x 2 sides; a row without a mask keeps `ok=False` and a reason:
"no_objects" (the item lists no objects) or "object_not_in_prompt" (none of its objects occurs in x_c). An ok
row's `objects` are the objects its mask covers: a listed object that x_c does not contain is left out there.

Which position stands for image token t: the sequence is T gen-prompt tokens then N image embeddings, so position
T-1+t *predicts* token t while position T+t has token t as its *input*. The spec (read from the authors' code) takes
the queries at T..T+N-1, the positions whose input is token t: the attention that token t's own position pays to the
object words. The last position T+N-1 is included (its prediction is unused in training, its query is not).
"""

from __future__ import annotations

import re
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import torch

from ospo_core.config import MasksConfig
from ospo_core.janus.chat import generation_prompt
from ospo_core.janus.image import gen_prompt_batch
from ospo_core.janus.score import check_image_tokens, image_token_logps
from ospo_core.records import MASKS, PAIRS, PROMPTS, to_table
from ospo_core.stages.common import ok_input_rows

SIDES = ("chosen", "rejected")
_PAIR_COLUMNS = ["item_id", "prompt", "chosen_tokens", "rejected_tokens"]
# A word's sub-tokens shorter than this are not used for substring matching: one- and two-letter pieces ("a", "s")
# occur inside most tokens and would put the whole prompt into every span.
MIN_SUBTOKEN_CHARS = 3
# Added to the min-max range so that a constant map normalises to zeros (an empty mask) instead of 0/0.
_MINMAX_EPS = 1e-8
_SENTINEL = "OSPO_PROMPT_SENTINEL"  # stands in for the prompt to find where the template puts it


def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold: the histogram cut that maximises the between-class variance w0·w1·(μ0 - μ1)².

    The histogram has `nbins` equal bins over [min, max]; the threshold is the centre of the last bin of the lower
    class, so `values > threshold` is the upper class (scikit-image's `threshold_otsu` convention, first maximum on
    ties). A constant array returns its value.

    Example: [0, 0, 0, 1, 1] -> every cut between the two filled bins has the same variance, the first wins: the
    centre of bin 0, 1/512.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if low == high:
        return low
    counts, edges = np.histogram(values, bins=nbins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    mass = counts * centres
    below = np.cumsum(counts)  # values in bins 0..i; >= 1 everywhere, bin 0 holds the minimum
    above = np.cumsum(counts[::-1])[::-1]  # values in bins i..end; >= 1 everywhere, the last bin holds the maximum
    mean_below = np.cumsum(mass) / below
    mean_above = np.cumsum(mass[::-1])[::-1] / above
    between = below[:-1] * above[1:] * (mean_below[:-1] - mean_above[1:]) ** 2  # cut after bin i
    return float(centres[np.argmax(between)])


def binarise(values: np.ndarray, otsu_scale: float) -> np.ndarray:
    """Min-max normalise an attention map, then keep the cells above otsu_scale x Otsu's threshold (bool)."""
    values = np.asarray(values, dtype=np.float64)
    normalised = (values - values.min()) / (values.max() - values.min() + _MINMAX_EPS)
    return normalised > otsu_scale * otsu_threshold(normalised)


def middle_layers(num_layers: int, skip: int) -> range:
    """The layers whose attention is read: all but the first and last `skip` (spec: 5..24 of 30).

    `skip` shrinks to (num_layers - 1) // 2 on small models, so at least one layer always remains (both layers of
    the 2-layer tiny model).
    """
    skip = min(skip, (num_layers - 1) // 2)
    return range(skip, num_layers - skip)


def object_spans(processor, prompt: str, objects: list[str]) -> dict[str, list[int]]:
    """For each object word, the indices of the gen-prompt tokens (unpadded, BOS = 0) that stand for it in `prompt`.

    The spec's rule on byte-level BPE, compared on each token's own text (space marker dropped, lower-cased):
    - the first match: the tokens covering the first case-insensitive occurrence of the word that starts a word in
      the prompt. On the characters rather than on the word's standalone tokens, so it also holds where BPE splits
      the word differently in context (capitals, sentence start, merges with punctuation);
    - plus every prompt token that contains one of the word's own sub-tokens (>= MIN_SUBTOKEN_CHARS characters) as
      a substring: later occurrences and inflected forms ("apples" for "apple").
    Only the user text is searched, never the chat template around it ("<|User|>", "Assistant"). A word that is not
    in the prompt gets an empty span.
    """
    tokenizer = processor.tokenizer
    text = prompt.strip()
    gen_text = generation_prompt(processor, prompt)
    begin = generation_prompt(processor, _SENTINEL).index(_SENTINEL)
    end = begin + len(text)
    if gen_text[begin:end] != text:
        raise ValueError(
            f"the chat template does not insert the prompt verbatim ({gen_text!r}); object spans need the prompt "
            "text inside the gen prompt: fix ospo_core.janus.chat.CHAT_TEMPLATE"
        )
    offsets = tokenizer(gen_text, return_offsets_mapping=True)["offset_mapping"]  # one (start, end) per token
    inside = [e > s and e > begin and s < end for s, e in offsets]  # the token overlaps the user text
    texts = [gen_text[s:e].strip().lower() if keep else "" for (s, e), keep in zip(offsets, inside)]
    spans = {}
    for word in objects:
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(part) for part in word.split())
        first = re.search(pattern, text, re.IGNORECASE)
        exact = set()
        if first:
            a, b = begin + first.start(), begin + first.end()
            exact = {i for i, (s, e) in enumerate(offsets) if inside[i] and s < b and e > a}
        word_offsets = tokenizer(" " + word.strip(), add_special_tokens=False, return_offsets_mapping=True)
        pieces = {(" " + word.strip())[s:e].strip().lower() for s, e in word_offsets["offset_mapping"]}
        pieces = [p for p in pieces if len(p) >= MIN_SUBTOKEN_CHARS]
        partial = {i for i, t in enumerate(texts) if t and any(p in t for p in pieces)}
        spans[word] = sorted(exact | partial)
    return spans


@contextmanager
def eager_attention(language_model):
    """Eager attention inside the block (only it forms the attention weights; SDPA/flash never do), then back."""
    previous = language_model.config._attn_implementation
    language_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        language_model.set_attn_implementation(previous)


@torch.no_grad()
def image_to_prompt_attention(
    model,
    prompt_ids: torch.Tensor,  # (B, T) left-padded gen-prompt ids
    prompt_mask: torch.Tensor,  # (B, T)
    image_tokens: torch.Tensor,  # (B, N)
    layers: range,
) -> torch.Tensor:
    """(B, N, T) fp32: attention of image position t (input = token t) to every gen-prompt key, mean over heads and
    `layers`.

    Runs the training sequence through `image_token_logps`, so the masks see exactly what the loss sees. Forward
    hooks read each selected layer's attention weights and reduce them at once, so only (B, N, T) per layer is kept,
    never the (B, H, T+N, T+N) maps of every layer that `output_attentions=True` would return.
    """
    language_model = model.model.language_model
    t, n = prompt_ids.shape[1], image_tokens.shape[1]
    total = torch.zeros(len(prompt_ids), n, t, dtype=torch.float32, device=prompt_ids.device)

    def read(module, args, output):
        weights = output[1]  # (B, H, T+N, T+N), softmax over keys
        if weights is None:
            raise RuntimeError(f"{type(module).__name__} returned no attention weights under eager attention; "
                               "object masks need a language model whose attention returns them")
        total.add_(weights[:, :, t : t + n, :t].float().mean(dim=1))  # (B, N, T)

    handles = [language_model.layers[i].self_attn.register_forward_hook(read) for i in layers]
    try:
        with eager_attention(language_model):
            image_token_logps(model, prompt_ids, prompt_mask, image_tokens)
    finally:
        for handle in handles:
            handle.remove()
    return total / len(layers)


def object_masks(pairs: pa.Table, prompts: pa.Table, tools, cfg: MasksConfig) -> pa.Table:
    """MASKS rows, one per (ok pair, side) in pair order, chosen before rejected."""
    bundle = tools.model
    objects_of = {r["item_id"]: r["objects"] for r in ok_input_rows(
        prompts, PROMPTS, ["item_id", "objects"], table_name="prompts", stage="masks")}
    rows = ok_input_rows(pairs, PAIRS, _PAIR_COLUMNS, table_name="pairs", stage="masks")
    ids = [r["item_id"] for r in rows]
    unknown = sorted({i for i in ids if i not in objects_of})
    if unknown:
        raise ValueError(f"masks: pair item(s) {unknown[:5]} have no ok row in the prompts table; pass the prompts "
                         "table of the round that produced these pairs")
    repeated = sorted(i for i, count in Counter(ids).items() if count > 1)
    if repeated:
        raise ValueError(f"masks: the pairs table holds several ok pairs for item(s) {repeated[:5]}; masks are keyed "
                         "by (item_id, side), so keep one pair per item (rerun the select stage)")

    out = []  # MASKS rows, ok rows completed below
    jobs = []  # (index into out, prompt, image tokens, object spans)
    for row in rows:
        objects = objects_of[row["item_id"]]
        spans = {o: s for o, s in object_spans(bundle.processor, row["prompt"], objects).items() if s}
        for side in SIDES:
            # `objects` of an ok row: the objects its mask covers; of a failed row: what the item listed.
            cell = {"item_id": row["item_id"], "side": side, "objects": list(spans) or objects, "grid": bundle.grid}
            if not objects:
                out.append({**cell, "ok": False, "reason": "no_objects"})
            elif not spans:
                out.append({**cell, "ok": False, "reason": "object_not_in_prompt"})
            else:
                jobs.append((len(out), row["prompt"], row[f"{side}_tokens"], list(spans.values())))
                out.append({**cell, "ok": True})

    layers = middle_layers(len(bundle.model.model.language_model.layers), cfg.layer_skip)
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start : start + cfg.batch_size]
        prompt_ids, prompt_mask = gen_prompt_batch(bundle, [j[1] for j in batch])  # (B, T)
        tokens = check_image_tokens(bundle, [j[2] for j in batch]).to(bundle.device)  # (B, N)
        attention = image_to_prompt_attention(bundle.model, prompt_ids, prompt_mask, tokens, layers)  # (B, N, T)
        if not bool(torch.isfinite(attention).all()):
            raise FloatingPointError(f"non-finite attention for prompt(s) {[j[1] for j in batch]!r}: the model "
                                     "weights are broken (NaN/inf); check the checkpoint or its last adapter")
        attention = attention.cpu()
        pads = (prompt_ids.shape[1] - prompt_mask.sum(-1)).tolist()  # (B,) left padding shifts every span
        for (index, _, _, spans), row_attention, pad in zip(batch, attention, pads):
            maps = [row_attention[:, [pad + i for i in span]].mean(-1).numpy() for span in spans]  # (N,) each
            union = np.logical_or.reduce([binarise(m, cfg.otsu_scale) for m in maps])  # OR over objects
            out[index]["mask"] = union.astype(np.float32).tolist()
    return to_table(out, MASKS)
