"""V3 object masks: Otsu, object spans, the stage on the tiny model, position bookkeeping, the trainer reading them."""

import math

import numpy as np
import pytest
import torch
from transformers.models.llama import modeling_llama

from ospo_core.plugins import tools_for
from ospo_core.config import MasksConfig, TrainConfig
from ospo_core.janus.image import gen_prompt_batch, sample_images
from ospo_core.janus.load import load_janus
from ospo_core.records import PAIRS, PROMPTS, to_table
from ospo_core.stages.masks import (
    binarise,
    image_to_prompt_attention,
    middle_layers,
    object_masks,
    object_spans,
    otsu_threshold,
)
from ospo_core.train.data import OSPOCollator, pairs_to_dataset, skipped_without_masks, tokenize_prompts
from ospo_core.train.loss import object_weights
from ospo_core.train.trainer import train_ospo

# item_id -> (short base prompt, objects of the prompts table)
ITEMS = {
    "0000000": ("a red apple", ["apple"]),
    "0000001": ("a big red apple on the wooden table", ["apple", "table"]),
    "0000002": ("two cats on a table", []),  # no objects listed -> "no_objects"
    "0000003": ("a green dog", ["zebra"]),  # listed object not in the prompt -> "object_not_in_prompt"
}


@pytest.fixture(scope="module")
def samples(tiny):
    return sample_images(tiny, ["a red apple"] * 8, seed=list(range(8)), batch_size=8).tokens


def _pairs(samples, items=ITEMS, extra=()):
    rows = [
        dict(item_id=item, t2i_category="attribute", sub_category="attribute1_color", rule="v3", prompt=prompt,
             rejected_prompt="a blue bus", chosen_tokens=samples[2 * i].tolist(),
             rejected_tokens=samples[2 * i + 1].tolist(), ok=True)
        for i, (item, (prompt, _)) in enumerate(items.items())
    ]
    return to_table(rows + list(extra), PAIRS)


def _prompts(items=ITEMS):
    return to_table([dict(item_id=item, prompt=prompt, objects=objects, ok=True, source="model")
                     for item, (prompt, objects) in items.items()], PROMPTS)


# --- Otsu, binarisation, layers -----------------------------------------------------------------------------------


def test_otsu_threshold_hand_cases():
    # Two filled bins (0 and 255): every cut between them has the same variance 3·2·(c0 - c255)², the first wins.
    assert otsu_threshold(np.array([0, 0, 0, 1, 1.0])) == pytest.approx(0.5 / 256)
    assert otsu_threshold(np.full(5, 0.3)) == 0.3  # constant: nothing to split


def test_otsu_threshold_splits_bimodal_array_like_exhaustive_search():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.03, 60), rng.normal(0.7, 0.05, 40)])
    threshold = otsu_threshold(values)
    assert values[:60].max() < threshold < values[60:].min()
    # The exact Otsu partition by brute force: maximise w0·w1·(μ0 - μ1)² over every cut of the sorted values.
    ordered = np.sort(values)
    between = [k * (len(ordered) - k) * (ordered[:k].mean() - ordered[k:].mean()) ** 2
               for k in range(1, len(ordered))]
    best = int(np.argmax(between)) + 1
    assert np.array_equal(values > threshold, values > ordered[best - 1])


def test_binarise_normalises_and_scales_the_threshold():
    values = np.array([10.0, 10.0, 10.0, 10.5, 12.0, 12.0])  # min-max -> [0, 0, 0, .25, 1, 1]
    assert binarise(values, 1.0).tolist() == [False, False, False, False, True, True]
    assert binarise(values, 0.1).tolist() == [False, False, False, True, True, True]  # lower scale, larger mask
    assert not binarise(np.full(6, 0.7), 0.8).any()  # a flat map marks nothing (and gives no NaN)


def test_middle_layers():
    assert middle_layers(30, 5) == range(5, 25)  # spec: layers 5..24 of Janus-Pro-7B
    assert middle_layers(2, 5) == range(0, 2)  # the tiny model keeps both layers
    assert middle_layers(3, 5) == range(1, 2)
    assert middle_layers(30, 0) == range(0, 30)


# --- spans --------------------------------------------------------------------------------------------------------


def test_object_spans_on_the_tiny_tokenizer(tiny):
    tokens = lambda prompt: tiny.tokenizer.convert_ids_to_tokens(  # noqa: E731
        gen_prompt_batch(tiny, [prompt])[0][0].tolist())

    def spans(prompt, words):
        found = object_spans(tiny.processor, prompt, words)
        return {w: [tokens(prompt)[i] for i in s] for w, s in found.items()}, found

    _, found = spans("a red apple on a wooden table.", ["apple", "table", "zebra"])
    assert found == {"apple": [7], "table": [11], "zebra": []}  # indices in the gen prompt, BOS = 0
    named, _ = spans("Three fluffy cats and two bicycles", ["cat", "bicycle"])
    assert named == {"cat": ["Ġcats"], "bicycle": ["Ġb", "ic", "y", "cle"]}  # inflected forms are covered
    named, _ = spans("a Lamp near a fishbowl", ["lamp"])
    assert named == {"lamp": ["L", "a", "mp"]}  # "Lamp" splits unlike " lamp" (Ġla, mp): matched on characters
    _, found = spans("an apple and a red apple", ["apple"])
    assert found == {"apple": [6, 10]}  # the first match plus the later token that contains "apple"
    # Only the user text is searched: the template's "Ass", "ist", "ant" are sub-tokens of " assistant".
    assert spans("a dog", ["assistant", "user"])[1] == {"assistant": [], "user": []}


# --- the stage on the tiny model ------------------------------------------------------------------------------------


def test_object_masks_rows_shapes_and_reasons(tiny, samples):
    rejected_pair = dict(item_id="0000009", prompt="a red apple", chosen_tokens=samples[0].tolist(),
                         rejected_tokens=samples[1].tolist(), ok=False, reason="no_chosen_candidate")
    masks = object_masks(_pairs(samples, extra=[rejected_pair]), _prompts(), tools_for(tiny), MasksConfig(batch_size=3))
    rows = masks.to_pylist()
    assert [(r["item_id"], r["side"]) for r in rows] == [(i, s) for i in ITEMS for s in ("chosen", "rejected")]
    by_item = {i: [r for r in rows if r["item_id"] == i] for i in ITEMS}
    for item in ("0000000", "0000001"):
        for row in by_item[item]:
            assert row["ok"] and row["reason"] is None and row["grid"] == tiny.grid
            assert len(row["mask"]) == tiny.grid**2 and set(row["mask"]) <= {0.0, 1.0}
            assert 0 < sum(row["mask"]) < tiny.grid**2  # the peak is in, the min-max minimum never is
    assert by_item["0000001"][0]["objects"] == ["apple", "table"]
    assert [(r["ok"], r["reason"], r["mask"]) for r in by_item["0000002"]] == [(False, "no_objects", None)] * 2
    assert [(r["reason"], r["objects"]) for r in by_item["0000003"]] == [("object_not_in_prompt", ["zebra"])] * 2
    assert tiny.model.model.language_model.config._attn_implementation == "sdpa"  # eager only during the pass


def test_object_masks_refuses_inconsistent_tables(tiny, samples):
    with pytest.raises(ValueError, match="prompts table"):
        object_masks(_pairs(samples), _prompts({"0000000": ITEMS["0000000"]}), tools_for(tiny), MasksConfig())
    twice = {"0000000": ITEMS["0000000"]}
    duplicate = dict(item_id="0000000", prompt="a red apple", chosen_tokens=samples[0].tolist(),
                     rejected_tokens=samples[1].tolist(), ok=True)
    with pytest.raises(ValueError, match="one pair per item"):
        object_masks(_pairs(samples, twice, extra=[duplicate]), _prompts(twice), tools_for(tiny), MasksConfig())


def test_attention_does_not_depend_on_left_padding(tiny, samples):
    """A row's (N, T) map is the same alone and in a padded batch, once its keys are aligned by its padding."""
    prompts = ["a red apple", "a big red apple on the wooden table"]
    tokens = samples[:2]
    ids, mask = gen_prompt_batch(tiny, prompts)
    batched = image_to_prompt_attention(tiny.model, ids, mask, tokens, range(0, 2))  # (2, N, T)
    for b, prompt in enumerate(prompts):
        alone = image_to_prompt_attention(tiny.model, *gen_prompt_batch(tiny, [prompt]), tokens[b : b + 1],
                                          range(0, 2))[0]  # (N, T_b)
        pad = ids.shape[1] - alone.shape[1]
        torch.testing.assert_close(batched[b, :, pad:], alone, atol=1e-6, rtol=0)
        assert batched[b, :, :pad].abs().sum() == 0  # padding keys get no attention
    assert ids.shape[1] - mask[0].sum() > 0  # the short prompt really was padded


def _patch_attention(monkeypatch, make_weights):
    """Replace eager attention's weights (not its output) by `make_weights(module, weights)`."""
    real = modeling_llama.eager_attention_forward

    def fake(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        output, weights = real(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        return output, make_weights(module, weights)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", fake)


def test_known_attention_gives_known_mask(tiny, samples, monkeypatch):
    """Image query T+t (input: image token t) looks at the object key on chosen cells, at <begin_of_image> elsewhere.

    Rows: item 0 chosen, item 0 rejected, item 1 chosen, item 1 rejected; item 0's short prompt is left-padded.
    The stage must return exactly the chosen cells; reading queries T-1+t would shift every mask by one cell, and
    forgetting the padding would miss item 0's "apple" key. Cells 0 and N-1 test both ends of the image span.
    """
    items = {k: ITEMS[k] for k in ("0000000", "0000001")}
    cells = [{0, 5, 10, 15}, {3, 6, 9, 12}, {1, 2, 7}, {15}]
    prompts = [p for p, _ in items.values() for _ in range(2)]
    ids, _ = gen_prompt_batch(tiny, prompts)  # the stage's batch: batch_size >= 4 rows
    t, n = ids.shape[1], tiny.num_image_tokens
    apple = [row.index(tiny.tokenizer.convert_tokens_to_ids("Ġapple")) for row in ids.tolist()]
    assert apple[0] != apple[2]  # different padding, so a key offset error shows

    def make_weights(module, weights):
        known = torch.zeros_like(weights)  # (B, H, T+N, T+N)
        for b in range(len(prompts)):
            for cell in range(n):
                known[b, :, t + cell, apple[b] if cell in cells[b] else t - 1] = 1.0
        return known

    _patch_attention(monkeypatch, make_weights)
    masks = object_masks(_pairs(samples, items), _prompts(items), tools_for(tiny), MasksConfig(batch_size=4)).to_pylist()
    assert [{i for i, v in enumerate(r["mask"]) if v} for r in masks] == cells


def test_only_the_middle_layers_are_read(tiny, samples, monkeypatch):
    """Layer l puts weight l + 1 on key 0 for every image query: the mean over layers reads back which were used."""

    def make_weights(module, weights):
        known = torch.zeros_like(weights)
        known[:, :, :, 0] = module.layer_idx + 1.0
        return known

    _patch_attention(monkeypatch, make_weights)
    ids, mask = gen_prompt_batch(tiny, ["a red apple"])
    read = lambda layers: image_to_prompt_attention(tiny.model, ids, mask, samples[:1], layers)  # noqa: E731
    assert read(range(1, 2))[..., 0].unique().tolist() == [2.0]
    assert read(range(0, 2))[..., 0].unique().tolist() == [1.5]
    assert read(range(0, 2))[..., 1:].abs().max() == 0


# --- the trainer reads the masks ------------------------------------------------------------------------------------


def test_training_with_object_masks(tiny, samples, tmp_path):
    pairs = _pairs(samples)
    masks = object_masks(pairs, _prompts(), tools_for(tiny), MasksConfig())
    cfg = TrainConfig(max_steps=2, batch_size=4, gradient_accumulation_steps=1, gradient_checkpointing=False,
                      logging_steps=1, object_weighting=True)
    bundle = load_janus("tiny", device="cpu")  # training takes ownership of the model: not the shared fixture

    dataset = pairs_to_dataset(pairs, bundle, cfg, masks)
    stored = {(r["item_id"], r["side"]): r for r in masks.to_pylist()}
    masked = [i for i in ITEMS if stored[(i, "chosen")]["ok"] and stored[(i, "rejected")]["ok"]]
    # a pair without both masks is skipped (spec), and counted
    assert dataset["item_id"] == masked and skipped_without_masks(pairs, masks) == len(ITEMS) - len(masked)
    dataset = dataset.map(tokenize_prompts, fn_kwargs={"processor": bundle.processor})
    batch = OSPOCollator(bundle.tokenizer.pad_token_id)(list(dataset))
    weights = batch["token_weights"]  # (3B, N): chosen, rejected, swapped (= chosen image) rows
    b = len(masked)
    torch.testing.assert_close(weights[2 * b :], weights[:b], atol=0, rtol=0)
    for row, item in enumerate(masked):
        for offset, side in ((0, "chosen"), (b, "rejected")):
            mask_row, w = stored[(item, side)], weights[offset + row]
            grid = torch.tensor(mask_row["mask"]).view(1, bundle.grid, bundle.grid)
            torch.testing.assert_close(w, object_weights(grid)[0], atol=1e-6, rtol=0)
            # Every masked cell gains weight (the blur also lifts its neighbours, so > 1 is not confined to it).
            assert (w[grid.flatten() > 0] > 1).all()

    result = train_ospo(pairs, bundle, cfg, tmp_path, masks=masks)
    losses = [r["value"] for r in result.history.to_pylist() if r["metric"] == "loss"]
    assert result.steps == 2 and losses and all(math.isfinite(v) for v in losses)
    assert result.final_metrics["pairs/skipped_no_mask"] == len(ITEMS) - len(masked)
