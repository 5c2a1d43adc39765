"""Rendering and self-VQA stages on the tiny model, then v2 selection over their tables."""

import datasets
import pyarrow as pa
import pytest

from ospo_core.plugins import tools_for
from ospo_core.config import RenderConfig, SelectConfig, VQAConfig
from ospo_core.janus.image import sample_images
from ospo_core.janus.score import score_yes_no
from ospo_core.records import DENSE, NEGATIVES, QUESTIONS, decode_image, to_table
from ospo_core.stages.common import row_seed
from ospo_core.stages.render import render
from ospo_core.stages.select import local_score, model_loglik, select_pairs
from ospo_core.stages.vqa import self_vqa
from ospo_core.store import read_table, write_table
from ospo_core.records import IMAGES, VQA

ITEMS = [("0000000", "a red apple", ["a green apple", "a red pear"]), ("1000000", "a cat left of a dog", ["a dog"])]


def _dense():
    rows = []
    for item, prompt, negs in ITEMS:
        for k, neg in enumerate(negs):
            rows.append(dict(item_id=item, t2i_category="attribute", sub_category="attribute1_color", k=k, seed=k,
                             prompt=prompt, negative_prompt=neg, dense_prompt=f"{prompt}, detailed",
                             negative_dense_prompt=f"{neg}, detailed", ok=True, source="model"))
    rows.append(dict(item_id="2000000", k=0, ok=False, reason="no_marker", source="model"))
    return to_table(rows, DENSE)


def _questions():
    rows = [dict(item_id=i, side="base", k=-1, prompt=p, questions=[f"Is there {p}?", "Is it red?"], ok=True)
            for i, p, _ in ITEMS]
    rows += [dict(item_id=i, side="negative", k=k, prompt=n, questions=[f"Is there {n}?"], ok=True)
             for i, _, negs in ITEMS for k, n in enumerate(negs)]
    return to_table(rows, QUESTIONS)


@pytest.fixture(scope="module")
def images(tiny):
    return render(_dense(), tools_for(tiny), RenderConfig(batch_size=3))


def test_render_rows_seeds_and_tokens(tiny, images, tmp_path):
    assert images.num_rows == 2 * 3  # 3 ok dense rows x (base, negative); the failed dense row is not rendered
    rows = images.to_pylist()
    for base, neg in zip(rows[::2], rows[1::2]):
        assert (base["side"], neg["side"]) == ("base", "negative")
        assert base["seed"] == neg["seed"] == row_seed(0, base["item_id"], base["k"])
    # each row's tokens are what the sampler draws for its prompt and seed alone, and decode to its PNG
    again = sample_images(tiny, [rows[3]["prompt"]], seed=rows[3]["seed"])
    assert again.tokens[0].tolist() == rows[3]["image_tokens"]
    assert list(decode_image(rows[3]["image"]).getdata()) == list(again.images[0].getdata())
    write_table(images, tmp_path / "images")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "images" / "*.parquet"), split="train")
    assert ds[0]["image"].size == (64, 64)
    assert read_table(tmp_path / "images", IMAGES).num_rows == 6


def test_vqa_scores_every_image_and_counts_corrupt_ones(tiny, images):
    rows = images.to_pylist()
    rows[1]["image"] = {"bytes": b"not a png", "path": None}  # one corrupt negative image
    table = pa.Table.from_pylist(rows, schema=images.schema)
    vqa = self_vqa(table, _questions(), tools_for(tiny), VQAConfig(batch_size=2))
    # base images: base questions (2) + their item's negative question sets (1 each); negatives: base questions
    per_item_negs = {i: len(n) for i, _, n in ITEMS}
    expected = sum(2 + per_item_negs[r["item_id"]] if r["side"] == "base" else 2 for r in rows)
    assert vqa.num_rows == expected
    bad = [r for r in vqa.to_pylist() if not r["ok"]]
    assert len(bad) == 2 and {r["reason"] for r in bad} == {"corrupt_image"}
    first = [r for r in vqa.to_pylist() if r["item_id"] == "0000000" and r["side"] == "base" and r["k"] == 0
             and r["question_set"] == "base"]
    direct = score_yes_no(tiny, [decode_image(rows[0]["image"])], [[q["question"] for q in first]])[0]
    got = [v for r in first for v in (r["p_yes"], r["p_no"])]
    assert got == pytest.approx([v for pair in direct for v in pair], abs=1e-6)
    assert local_score([r["p_yes"] for r in first], [r["p_no"] for r in first]) <= 1


def test_v2_selection_runs_on_stage_tables(tiny, images):
    vqa = self_vqa(images, _questions(), tools_for(tiny), VQAConfig())
    negatives = to_table([dict(item_id=i, k=k, prompt=p, negative_prompt=n, perturbation="replace", ok=True)
                          for i, p, negs in ITEMS for k, n in enumerate(negs)], NEGATIVES)
    pairs = select_pairs(images, vqa, _questions(), negatives, SelectConfig(margin=0.0), model_loglik(tiny))
    assert pairs.num_rows == 2  # one row per item, selected or rejected with a reason
    for row in pairs.to_pylist():
        assert row["ok"] or row["reason"]
