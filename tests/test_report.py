"""What the Prefect UI shows of a round, without a server: the run form's presets and ranges, embedded thumbnails,
the training curves and stage pictures, and the progress a text stage reports through its log records."""

import base64
import io
import logging
import re

import pyarrow as pa
import pytest
from PIL import Image

from ospo_core import report
from ospo_core.config import PRESETS, RoundConfig, apply_preset, nearest_preset, preset_config
from ospo_core.records import EVAL, IMAGES, TRAIN_HISTORY, VQA, image_cell, to_table


def test_a_preset_fills_the_fields_left_as_the_form_shows_them_and_keeps_the_changed_ones():
    form = preset_config("demo").model_dump(mode="json")
    form["train"]["max_steps"] = 3
    form["model"] = "/models/Janus-Pro-7B"
    config = RoundConfig.model_validate(form)
    paper = apply_preset(config, "paper")
    assert paper.train.max_steps == 3 and paper.model == "/models/Janus-Pro-7B"
    assert paper.prompts.max_len is None and paper.prompts.fallback == "none"  # the paper's, not the form's
    assert nearest_preset(paper) == ("paper", ["train.max_steps"])
    assert apply_preset(config, "demo") == config  # the form as shown
    assert {name: nearest_preset(preset_config(name))[0] for name in PRESETS} == {name: name for name in PRESETS}


def test_every_bounded_field_of_the_run_form_states_its_range_in_its_description():
    definitions = RoundConfig.model_json_schema()["$defs"]
    bounded = 0
    for model in definitions.values():
        for name, prop in model.get("properties", {}).items():
            branches = [prop, *prop.get("anyOf", [])]
            if any(k in b for b in branches for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
                bounded += 1
                assert "Range: " in prop["description"], name
    assert bounded > 50
    cfg_weight = definitions["RenderConfig"]["properties"]["cfg_weight"]["description"]
    assert cfg_weight.endswith("Range: >= 0, <= 50.")


def _png(markdown: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)]


def test_an_embedded_thumbnail_is_a_downscaled_png_under_the_byte_cap():
    noise = Image.frombytes("RGB", (640, 640), bytes(range(256)) * (640 * 640 * 3 // 256))
    markdown = report.embed(noise, "a [noisy] image", max_px=300, max_bytes=30_000)
    assert markdown.startswith("![a (noisy) image](data:image/png;base64,")
    (thumbnail,) = _png(markdown)
    assert thumbnail.format == "PNG" and max(thumbnail.size) <= 300
    assert len(base64.b64decode(markdown.split(",", 1)[1][:-1])) <= 30_000


def test_stage_pictures_show_each_image_with_its_prompt_and_questions():
    red, blue = (image_cell(Image.new("RGB", (32, 32), c)) for c in ("red", "blue"))
    base = {"item_id": "c000001", "t2i_category": "color", "sub_category": "color1", "k": 0, "seed": 1,
            "image_tokens": [1, 2], "ok": True}
    images = to_table([{**base, "side": "base", "prompt": "a red | apple", "image": red},
                       {**base, "side": "negative", "prompt": "a blue apple", "image": blue}], IMAGES)
    shown = report.images_markdown(images)
    assert len(_png(shown)) == 2 and "a red / apple" in shown and "a blue apple" in shown
    vqa = to_table([{**{k: base[k] for k in ("item_id", "t2i_category", "sub_category", "k")}, "side": "negative",
                     "question_set": "base", "q_index": 0, "question": "Is the apple red?", "p_yes": 0.25,
                     "p_no": 0.75, "answer": "no", "ok": True}], VQA)
    answered = report.vqa_markdown(vqa, images)
    (image,) = _png(answered)
    assert image.convert("RGB").getpixel((0, 0)) == (0, 0, 255)  # the negative side's image, asked about
    assert "| base | Is the apple red? | 0.250 | 0.750 | no |" in answered
    judged = to_table([{"prompt_set": "geneval", "prompt_id": str(i), "category": category, "prompt": f"prompt {i}",
                        "tags": [], "k": 0, "seed": i, "image": red, "score": score, "all_yes": score > 0, "ok": True}
                       for i, (category, score) in enumerate([("colors", 0.5), ("counting", -0.25)])], EVAL)
    bars, *samples = _png(report.eval_markdown(judged))
    assert bars.width == 480 and len(samples) == 2  # mean score per category, then each image
    assert "| counting | prompt 1 | -0.250 | no |" in report.eval_markdown(judged)


def test_training_curves_plot_the_logged_loss_terms_margins_and_chosen_nll():
    rows = [{"step": s, "metric": m, "value": v} for s in (1, 2, 3)
            for m, v in (("loss", 2.0 / s), ("loss/sft", 1.0 / s), ("rewards/margins", 0.1 * s),
                         ("nll/chosen", 5.0 - s))]
    image = report.training_curves(to_table(rows, TRAIN_HISTORY))
    assert image.size == (900, 260)  # three panels: loss terms, margins, chosen NLL
    assert report.training_curves(to_table(rows[:1], TRAIN_HISTORY)).size == (300, 260)
    assert report.training_curves(to_table([], TRAIN_HISTORY)) is None


def test_a_text_stage_logs_its_progress_as_it_writes(monkeypatch):
    from ospo_core.config import PerturbConfig
    from ospo_core.stages import common

    calls = []
    def generate_text(bundle, chats, *, seed, progress, **kw):  # the engine reports chats as they finish
        calls.append(len(chats))
        for done in range(1, len(chats) + 1):
            progress(done, len(chats))
        return [f"answer {s}" for s in seed]

    monkeypatch.setattr(common, "generate_text", generate_text)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ospo.stages")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        out = common.write_texts(None, ["chat"] * 1000, list(range(1000)), PerturbConfig(), "negatives")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert out == [f"answer {s}" for s in range(1000)] and calls == [1000]  # one decoding run
    assert [r.progress for r in records] == [(512, 1000), (1000, 1000)]
    assert records[-1].getMessage() == "negatives: 1000/1000 answers written"


def test_the_summary_links_the_tables_where_ospo_home_is_served_over_http(monkeypatch, tmp_path):
    from tasks.report import HOME_URL, home_url

    pairs = tmp_path / "runs" / "r1" / "pairs"
    manifest = {"status": "finished", "path": str(pairs.parent), "model": {"source": "tiny", "adapters": []},
                "tables": {"pairs": {"path": str(pairs), "counts": {"rows": 3, "ok": 2, "rejected:no_chosen": 1}}}}
    monkeypatch.delenv(HOME_URL, raising=False)
    assert home_url(tmp_path, pairs) is None
    local = report.summary_markdown("r1", manifest, {"loss": 1.5, "grad_norm": 2.0}, preset="demo", scale="small",
                                    url=lambda path: home_url(tmp_path, path))
    assert f"| pairs | 3 | 2 | no_chosen: 1 | `{pairs}` |" in local
    assert "| loss | 1.5 |" in local and "grad_norm" not in local  # the key metrics; all are in train_history
    monkeypatch.setenv(HOME_URL, "https://files.example/ospo/")
    assert home_url(tmp_path, pairs) == "https://files.example/ospo/runs/r1/pairs"
    assert home_url(tmp_path, "/elsewhere/pairs") is None
    served = report.summary_markdown("r1", manifest, {}, url=lambda path: home_url(tmp_path, path))
    assert "| [pairs](https://files.example/ospo/runs/r1/pairs) |" in served
