"""The shapes-world testbed: the oracle on hand-made grids, the grammar, the world-written stages, the oracle judge
in the self-VQA stage, and that two rounds of the default OSPO setting raise held-out accuracy (`ospo testbed`)."""

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from ospo_core import config as configs
from ospo_core.plugins import tools_for
from ospo_core.config import TESTBED_OVERRIDES, PerturbConfig, PromptsConfig, RoundConfig, VQAConfig, deep_update
from ospo_core.records import IMAGES, QUESTIONS, image_cell, to_table
from ospo_core.stages.perturb import perturb
from ospo_core.stages.prompts import generate_prompts
from ospo_core.stages.questions import generate_questions
from ospo_core.stages.vqa import self_vqa
from ospo_core.testbed.ablation import read_tables, run_ablation, run_testbed
from ospo_core.testbed.evaluate import score_scene
from ospo_core.testbed.oracle import answer, oracle_scores
from ospo_core.janus.load import JanusBundle, load_janus
from ospo_core.records import decode_image
from ospo_core.testbed.judge import encode_png, question_batch
from ospo_core.testbed.pretrain import SHIPPED, shipped_checkpoint
from ospo_core.testbed.render import draw_scene
from ospo_core.testbed.world import CATEGORIES, WORLD, CaptionError, Kind

E = 0  # an empty cell


def cell(colour: str, shape: str) -> int:
    return WORLD.token(Kind(colour, shape))


R_SQ, B_CI = cell("red", "square"), cell("blue", "circle")
G_TR, Y_SQ = cell("green", "triangle"), cell("yellow", "square")

# Row by row (raster order = image-token order). A red square in the top-left corner, a blue circle two cells to its
# right on the same row, three green triangles on the bottom row.
GRID = [
    R_SQ, E, B_CI, E,
    E, E, E, E,
    E, E, E, E,
    G_TR, G_TR, G_TR, E,
]


@pytest.mark.parametrize("question, expected", [
    ("Is there one red square?", True),
    ("Is there a red square?", True),
    ("Are there two red squares?", False),
    ("Are there three green triangles?", True),
    ("Are there two green triangles?", False),  # exact counts: three is not two
    ("Is there a yellow square?", False),
    ("Is there one blue circle?", True),
    ("Is the red square left of the blue circle?", True),
    ("Is the blue circle right of the red square?", True),
    ("Is the red square right of the blue circle?", False),
    ("Is the red square above the blue circle?", False),  # same row: neither above nor below
    ("Is the red square above the green triangles?", True),
    ("Are the green triangles below the blue circle?", True),
    ("Are the green triangles left of the blue circle?", False),  # one of them (column 2) is not
    ("Is the red square left of the yellow square?", False),  # no yellow square: the relation cannot hold
    ("Are there five shapes in total?", True),
    ("Are there four shapes in total?", False),
    ("  is THERE one Red Square ", True),  # case, spacing and the question mark do not matter
])
def test_oracle_answers_questions_about_a_hand_made_grid(question, expected):
    assert answer(GRID, question) is expected


def test_oracle_scores_are_exact_probabilities_and_unknown_questions_are_none():
    scores = oracle_scores(GRID, ["Is there one red square?", "Is there a purple square?", "Is the cat happy?",
                                  "Are there two red squares?"])
    assert scores == [(1.0, 0.0), None, None, (0.0, 1.0)]


def test_oracle_refuses_grids_of_another_model():
    with pytest.raises(ValueError, match="16 cells"):
        answer(GRID[:9], "Is there one red square?")
    with pytest.raises(ValueError, match="not a cell of this world"):
        answer([63] + GRID[1:], "Is there one red square?")


def test_world_questions_hold_exactly_for_the_scenes_of_their_caption():
    """Every question of a caption is true on a sampled scene of it; moving one object or adding one breaks it."""
    rng = random.Random(0)
    for category in CATEGORIES:
        train, heldout = WORLD.split(category)
        assert not {d.key() for d in train} & {d.key() for d in heldout}
        for d in rng.sample(train, 5):
            d = WORLD.wording(d, rng)
            caption = WORLD.caption(d)
            assert WORLD.parse(caption) == d and d.category == category
            scene = WORLD.sample_scene(d, rng)
            assert score_scene(WORLD, scene, d) == {"exact": True, "asked": d.objects, "found": d.objects,
                                                   "drawn": d.objects}
            extra = scene.copy()
            extra[extra.index(E)] = Y_SQ if all(g.kind != Kind("yellow", "square") for g in d.groups) else G_TR
            scored = score_scene(WORLD, extra, d)
            assert not scored["exact"] and scored["drawn"] == d.objects + 1


def test_captions_parse_back_or_fail_with_the_reason():
    d = WORLD.parse("two red squares above a blue circle")
    assert (d.category, d.relation, d.objects) == ("complex", "above", 3)
    assert WORLD.parse("a blue circle below two red squares").key() == d.key()  # the same scene, said backwards
    for bad, reason in [("a red squares", "agree in number"), ("a red square and a red square", "same kind"),
                        ("a purple square", "not a caption"), ("five red squares", "not a caption")]:
        with pytest.raises(CaptionError, match=reason):
            WORLD.parse(bad)


@pytest.mark.parametrize("caption, method, expected", [
    ("a red square and a blue circle", "swap", "a blue square and a red circle"),
    ("a red square left of a blue circle", "swap", "a blue circle left of a red square"),
    ("two red squares and one blue circle", "swap", "one red square and two blue circles"),
    ("a red square", "swap", None),
    ("a red square and a red circle", "swap", None),  # exchanging equal colours changes nothing
])
def test_swap_exchanges_what_the_category_is_about(caption, method, expected):
    negative = WORLD.perturb(WORLD.parse(caption), method, random.Random(0))
    assert (negative and WORLD.caption(negative)) == expected


def test_replace_and_drop_always_change_the_scene():
    rng = random.Random(1)
    for category in CATEGORIES:
        for d in WORLD.split(category)[0][:20]:
            for method in ("replace", "drop"):
                negative = WORLD.perturb(d, method, rng)
                if method == "drop" and len(d.groups) == 1:
                    assert negative is None
                else:
                    assert negative.key() != d.key()
                    assert WORLD.parse(WORLD.caption(negative)) == negative  # a caption the world can write
                    assert len(negative.groups) == (1 if method == "drop" else len(d.groups))


def test_testbed_text_stages_write_world_captions_negatives_and_questions():
    cfg = RoundConfig.model_validate(TESTBED_OVERRIDES)
    prompts = generate_prompts(tools_for(None, world="shapes"), cfg.prompts.model_copy(update={"quotas": dict.fromkeys(CATEGORIES, 3)}))
    assert prompts.num_rows == 18 and set(prompts.column("source").to_pylist()) == {"testbed"}
    heldout = {d.key() for c in CATEGORIES for d in WORLD.split(c)[1]}
    assert not any(WORLD.parse(p).key() in heldout for p in prompts.column("prompt").to_pylist())
    assert prompts.column("item_id").to_pylist()[:3] == ["0000000", "0000001", "0000002"]
    negatives = perturb(prompts, tools_for(None, world="shapes"), cfg.perturb)
    assert negatives.num_rows == 18 * 3
    assert sum(negatives.column("ok").to_pylist()) >= 0.9 * negatives.num_rows
    for row in negatives.to_pylist():  # failures are kept with their reason, never dropped
        assert row["ok"] or row["reason"] == f"nothing_to_{row['perturbation']}"
        if row["ok"]:
            assert WORLD.parse(row["negative_prompt"]).key() != WORLD.parse(row["prompt"]).key()
    questions = generate_questions(prompts, negatives, tools_for(None, world="shapes"), cfg.questions)
    first = questions.to_pylist()[0]
    assert first["questions"] == WORLD.questions(WORLD.parse(first["prompt"]))


def test_testbed_prompts_refuse_categories_the_world_does_not_have():
    with pytest.raises(ValueError, match="no captions for \\['shape1'\\]"):
        generate_prompts(tools_for(None, world="shapes"), PromptsConfig(sub_categories=("color1", "shape1")))
    with pytest.raises(ValueError, match="exceeds the 9 training captions"):
        generate_prompts(tools_for(None, world="shapes"), PromptsConfig(sub_categories=("color1",), quotas={"color1": 10}))


def test_a_model_written_prompt_reaching_a_testbed_stage_is_kept_and_marked():
    prompts = generate_prompts(tools_for(None, world="shapes"), PromptsConfig(sub_categories=("color1",), quotas={"color1": 1}))
    prompts = prompts.set_column(prompts.schema.get_field_index("prompt"), "prompt",
                                 [["a fluffy cat on a wooden table"]])
    negatives = perturb(prompts, tools_for(None, world="shapes"), PerturbConfig())
    assert negatives.column("reason").to_pylist() == ["not_a_world_caption"] * 3


def test_self_vqa_with_the_oracle_judge_reads_the_image_tokens():
    # Each PNG shows the other side's grid: the answers must follow the tokens, not the picture.
    images = to_table([{"item_id": "0000000", "t2i_category": "attribute", "sub_category": "attribute2",
                        "side": side, "k": 0, "seed": 0, "prompt": "p", "image": image_cell(draw_scene(picture)),
                        "image_tokens": grid, "ok": True}
                       for side, grid, picture in (("base", GRID, [E] * 16), ("negative", [E] * 16, GRID))], IMAGES)
    questions = to_table([{"item_id": "0000000", "t2i_category": "attribute", "sub_category": "attribute2",
                           "side": "base", "k": -1, "prompt": "p", "ok": True,
                           "questions": ["Is there one red square?", "Is there a dog?"]}], QUESTIONS)
    vqa = self_vqa(images, questions, tools_for(None, judge="oracle"), VQAConfig(judge="oracle")).to_pylist()
    assert [(r["side"], r["p_yes"], r["answer"], r["reason"]) for r in vqa] == [
        ("base", 1.0, "yes", None), ("base", None, None, "oracle_unknown_question"),
        ("negative", 0.0, "no", None), ("negative", None, None, "oracle_unknown_question"),
    ]


def test_the_testbed_command_line_changes_only_what_it_names():
    from ospo_cli.main import UsageError, build_parser, build_testbed_config

    args = build_parser().parse_args(["testbed", "--seeds", "2", "--settings", "ospo,sft", "--judge", "self",
                                      "--set", "round.train.max_steps=20", "--set", "pretrain.steps=500"])
    cfg = build_testbed_config(args)
    assert (cfg.seeds, cfg.settings, cfg.judges) == ([0, 1], ["ospo", "sft"], ["self_grid"])
    assert build_testbed_config(build_parser().parse_args(["testbed"])).judges == ["oracle", "self_grid"]
    assert (cfg.round.train.max_steps, cfg.pretrain.steps) == (20, 500)
    # the rest of the round is still the testbed preset, not the paper's defaults
    assert cfg.round.world == "shapes"
    assert cfg.round.train.learning_rate == TESTBED_OVERRIDES["train"]["learning_rate"]
    with pytest.raises(UsageError, match="unknown testbed setting"):
        build_testbed_config(build_parser().parse_args(["testbed", "--settings", "ospo,best"]))


# ---------------------------------------------------------------- the shipped start model and its judge


@pytest.fixture(scope="module")
def one_thread():
    """The testbed model's matrices are tiny: one torch thread is faster (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


JUDGE_AGREEMENT = 0.85  # the target; the shipped judge: 0.905 on these 400 questions, 0.922 on the build's 512


@pytest.fixture(scope="module")
def checkpoint(one_thread):
    """The shipped start model: the default pre-training, so no test (and no user) pre-trains to run a round."""
    assert shipped_checkpoint(configs.PretrainConfig()) == SHIPPED, "the shipped checkpoint is not the default one"
    return SHIPPED


def test_the_judge_encoder_reads_drawn_grids_back_and_refuses_other_pictures():
    rng = random.Random(0)
    for _ in range(20):
        grid = [rng.randrange(WORLD.codebook_size) if rng.random() < 0.4 else E for _ in range(WORLD.cells)]
        assert encode_png(decode_image(image_cell(draw_scene(grid)))) == grid  # through PNG bytes, as stored
    assert encode_png(Image.new("RGB", (32, 32), "white")) is None


def test_the_shipped_model_judges_its_own_pngs_mostly_like_the_oracle(checkpoint):
    """Balanced held-out questions (captions never seen in pre-training) through the self-VQA stage's plug-in: the
    answers are the model's own probabilities read from the PNGs, and agree with the oracle on JUDGE_AGREEMENT of
    them (measured 0.905 on these 400). A picture that is
    not a grid drawing cannot be read."""
    bundle = load_janus(checkpoint)
    rows = question_batch(WORLD, random.Random(7), 400, heldout=True)
    assert sum(truth for _, _, truth in rows) == 200  # balanced: always answering yes scores 50%
    images = [{"image": image_cell(draw_scene(scene))} for scene, _, _ in rows]
    images.append({"image": image_cell(Image.new("RGB", (32, 32), "white"))})
    judge = tools_for(bundle, world="shapes", judge="self_grid").judge
    scores = judge.answer(images, [[q] for _, q, _ in rows] + [["Is there one red square?"]], 64)
    assert scores[-1] is None
    assert all(0 < s[0][0] < 1 and 0 < s[0][1] < 1 for s in scores[:-1])  # probabilities, not the oracle's 1/0
    agree = sum((s[0][0] > s[0][1]) == truth for s, (_, _, truth) in zip(scores, rows)) / len(rows)
    assert agree >= JUDGE_AGREEMENT, agree


def test_the_self_judge_can_be_the_start_checkpoint_instead_of_the_round_model(checkpoint):
    """TestbedConfig.self_judge = "start": the checkpoint the rounds started from answers, whatever the round's model
    has become, and its identity (part of the stage's cache key) names the folder."""
    from ospo_core.testbed.ablation import round_config
    from ospo_core.testbed.model import build_testbed_janus

    shipped = load_janus(checkpoint)
    untrained, processor = build_testbed_janus(WORLD, 1, 128, 4)  # stands for a round model whose judge has drifted
    drifted = JanusBundle(untrained, processor, fingerprint="drifted", source="testbed")
    rows = question_batch(WORLD, random.Random(3), 16, heldout=True)
    images = [{"image": image_cell(draw_scene(scene))} for scene, _, _ in rows]
    questions = [[q] for _, q, _ in rows]
    anchored = tools_for(drifted, world="shapes", judge="self_grid", judge_model=str(checkpoint)).judge
    assert anchored.answer(images, questions, 8) == tools_for(shipped, world="shapes", judge="self_grid").judge.answer(
        images, questions, 8)
    assert anchored.answer(images, questions, 8) != tools_for(drifted, world="shapes", judge="self_grid").judge.answer(
        images, questions, 8)
    assert str(checkpoint) in anchored.identity
    assert tools_for(drifted, world="shapes", judge="self_grid").judge.identity == ""

    cfg = configs.TestbedConfig()
    assert round_config(cfg, checkpoint, 0, 3, "ospo", "self_grid").vqa.judge_model == str(checkpoint)
    assert round_config(cfg.model_copy(update={"self_judge": "round"}), checkpoint, 0, 3, "ospo",
                        "self_grid").vqa.judge_model is None
    assert round_config(cfg, checkpoint, 0, 3, "ospo", "oracle").vqa.judge_model is None
    with pytest.raises(ValueError, match="round.vqa.judge_model is set by self_judge"):
        configs.TestbedConfig.model_validate({"round": {"vqa": {"judge_model": str(checkpoint)}}})


def test_ospo_run_model_testbed_is_a_self_judged_round_on_the_shipped_model():
    from ospo_cli.main import build_parser, build_round_config

    config, preset = build_round_config(build_parser().parse_args(["run", "--model", "testbed"]))
    assert (preset, config.model, config.world, config.vqa.judge) == ("testbed-demo", str(SHIPPED), "shapes",
                                                                      "self_grid")


def test_the_start_model_is_built_by_one_deterministic_command(tmp_path, one_thread, capsys):
    from ospo_cli.main import main

    small = [f"--set=pretrain.{key}" for key in ("steps=3", "noisy_steps=2", "judge_steps=2", "batch_size=4",
                                                 "judge_batch_size=4", "judge_draw_batch_size=4")]
    for name in ("a", "b"):
        assert main(["testbed", "--build-checkpoint", str(tmp_path / name), *small]) == 0
    a, b = ((tmp_path / name / "model.safetensors").read_bytes() for name in ("a", "b"))
    assert a == b
    meta = json.loads((tmp_path / "a" / "ospo_testbed.json").read_text())
    assert meta["pretrain"]["judge_steps"] == 2 and shipped_checkpoint(configs.PretrainConfig(**meta["pretrain"])) is None
    assert main(["testbed", "--build-checkpoint", str(tmp_path / "a"), *small]) == 2
    assert "not empty" in capsys.readouterr().err


# ---------------------------------------------------------------- rounds on the shipped testbed model

# Small settings: one seed, fewer prompts, the shipped start model (held-out samples as the table's: at 48 a
# category the start model measured 0.288 instead of 0.272, noise as large as the gains asserted).
SMALL = configs.TestbedConfig.model_validate({
    "seeds": [0], "settings": ["ospo"], "judges": ["oracle"], "rounds": 2, "workers": 1,
    "round": {"prompts": {"quotas": {"2D_spatial": 48, "numeracy2": 48, "complex": 48}}},
})


@pytest.mark.slow
def test_two_default_rounds_raise_heldout_accuracy(checkpoint, tmp_path):
    """`ospo testbed`'s own function on the cached start model: the gain, and every output the README lists."""
    from PIL import Image

    run_dir, table = run_testbed(SMALL, tmp_path, checkpoint, log=lambda message: None)
    rows = json.loads((run_dir / "results.json").read_text())
    exact = {r["round"]: r["exact"] for r in rows if r["category"] == "all"}
    assert exact[2] >= exact[0] + 0.03, exact  # measured 0.272 -> 0.318 -> 0.316
    assert (run_dir / "results.md").read_text().strip() == table.strip()
    assert f"| ospo, oracle | {exact[0]:.3f} | {exact[1]:.3f} | {exact[2]:.3f} |" in table
    for picture in ("ablation.png", "samples.png"):
        with Image.open(run_dir / picture) as image:
            assert image.width > 200 and image.height > 100
    round_2 = read_tables(run_dir / "seed-0" / "oracle" / "ospo" / "round-2")
    assert {"pairs", "vqa", "train_history", "testbed_eval"} <= set(round_2)


@pytest.mark.slow
def test_two_self_judged_rounds_raise_heldout_accuracy(checkpoint, tmp_path):
    """Self-improvement: the shipped model judges its own drawings, selects its pairs and trains on them; two rounds
    of the v2 default raise held-out exact-scene accuracy on seed 0 (the start checkpoint judges both rounds,
    TestbedConfig.self_judge). Measured 0.272 -> 0.337 -> 0.315 with 84 and 89 pairs: round 2 keeps most of round
    1's gain (TESTBED.md)."""
    cfg = SMALL.model_copy(update={"judges": ["self_grid"]})
    rows = [r for r in run_ablation(cfg, checkpoint, tmp_path, log=lambda message: None) if r["category"] == "all"]
    exact = {r["round"]: r["exact"] for r in rows}
    assert exact[1] >= exact[0] + 0.03 and exact[2] >= exact[0] + 0.03, exact
    assert all(r["pairs"] > 0 for r in rows if r["round"] > 0), rows


@pytest.mark.slow
def test_a_testbed_round_runs_through_the_flow(prefect, checkpoint, tmp_path):
    """The same round through Prefect: world-written text, images drawn from their tokens, oracle answers."""
    from flows.round import ospo_round
    from ospo_core import store
    from ospo_core.records import SCHEMAS, decode_image

    config = RoundConfig.model_validate(deep_update(TESTBED_OVERRIDES, {
        "model": str(checkpoint), "round_id": "testbed",
        "prompts": {"quotas": dict.fromkeys(CATEGORIES, 4)}, "train": {"max_steps": 2, "save_steps": 2},
    }))
    manifest = ospo_round(config, home=str(tmp_path))

    def table(name):
        return store.read_table(Path(manifest["tables"][name]["path"]), SCHEMAS[name], name=name).to_pylist()

    assert {r["source"] for r in table("negatives")} == {"testbed"}
    assert table("vqa") and {(r["p_yes"], r["p_no"]) for r in table("vqa")} <= {(1.0, 0.0), (0.0, 1.0)}
    image = table("images")[0]
    assert decode_image(image["image"]).tobytes() == draw_scene(image["image_tokens"]).tobytes()
    pairs = [r for r in table("pairs") if r["ok"]]
    assert pairs and all(score_scene(WORLD, r["chosen_tokens"], WORLD.parse(r["prompt"]))["exact"] for r in pairs)
    assert Path(manifest["adapter"], "adapter_model.safetensors").is_file()
