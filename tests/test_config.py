"""Config: one declaration per concept, the world switch, and values that could only fail later refused up front."""

import math
from typing import get_args

import pytest
from pydantic import BaseModel, ValidationError

from ospo_core.config import (
    PRESETS,
    TESTBED_OVERRIDES,
    EvalConfig,
    ImageSamplingConfig,
    OSPOLossConfig,
    PerturbConfig,
    QuestionsConfig,
    RenderConfig,
    RoundConfig,
    SelfImproveConfig,
    TrainConfig,
    deep_update,
)
from ospo_core.config import TestbedConfig as ShapesAblationConfig  # pytest would collect a name Test*


def _refused(model: type[BaseModel], document: dict, field: str) -> str:
    """Validate `document`; it must fail, and the error must name `field` (dotted path)."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(document)
    paths = [".".join(map(str, e["loc"])) for e in info.value.errors()]
    assert field in paths, paths
    return str(info.value)


def _nested(path: str, value) -> dict:
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


# ---------------------------------------------------------------- the world switch


def test_world_is_paper_by_default_and_shapes_in_the_testbed_preset():
    assert RoundConfig().world == "paper"
    assert RoundConfig.model_validate(deep_update({}, PRESETS["testbed"])).world == "shapes"
    assert ShapesAblationConfig().round.world == "shapes"
    assert TESTBED_OVERRIDES["vqa"]["judge"] == "oracle"
    _refused(RoundConfig, {"world": "testbed"}, "world")


@pytest.mark.parametrize("path", ["prompts.source", "perturb.source", "densify.source", "questions.source",
                                  "render.decoder"])
def test_old_per_stage_switches_are_refused_by_name(path):
    """The world replaced them: an old YAML file is told which key is unknown instead of being half applied."""
    _refused(RoundConfig, _nested(path, "testbed"), path)


# ---------------------------------------------------------------- one declaration per concept


@pytest.mark.parametrize("path, value", [("train.simpo_beta", 2.0), ("train.label_smoothing", 0.1),
                                         ("render.cfg_weight", 3.0), ("render.compile_mode", "eager"),
                                         ("prompts.temperature", 0.7), ("prompts.fallback", "structured"),
                                         ("questions.top_p", 0.8), ("perturb.max_new_tokens", 64)])
def test_round_field_paths_still_set_their_value(path, value):
    cfg = RoundConfig.model_validate(_nested(path, value))
    section, name = path.split(".")
    assert getattr(getattr(cfg, section), name) == value


def test_eval_samples_with_the_render_stage_settings():
    """One sampling declaration: eval.* and render.* have the same fields, defaults and ranges."""
    shared = set(ImageSamplingConfig.model_fields)
    assert shared == {"cfg_weight", "temperature", "seed", "batch_size", "compile_mode"}
    assert EvalConfig().model_dump(include=shared) == RenderConfig().model_dump(include=shared)
    assert EvalConfig(cfg_weight=1.0).cfg_weight == 1.0
    for model in (EvalConfig, RenderConfig):
        _refused(model, {"cfg_weight": 51}, "cfg_weight")


def test_text_stages_keep_their_own_spec_defaults_under_one_declaration():
    assert (QuestionsConfig().temperature, QuestionsConfig().top_p, QuestionsConfig().max_new_tokens) == (1.2, 0.5, 256)
    assert (PerturbConfig().temperature, PerturbConfig().top_p, PerturbConfig().max_new_tokens) == (1.2, 0.9, 512)
    prompts = RoundConfig().prompts
    assert (prompts.temperature, prompts.top_p, prompts.max_new_tokens, prompts.batch_size) == (1.0, 1.0, 512, "auto")
    for section in ("prompts", "perturb", "densify", "questions"):  # one range check for every stage
        _refused(RoundConfig, _nested(f"{section}.top_p", 1.5), f"{section}.top_p")


def test_train_config_is_the_loss_config():
    """The loss reads the train section itself: no renamed copy whose default or range could drift."""
    assert isinstance(TrainConfig(), OSPOLossConfig)
    assert set(OSPOLossConfig.model_fields) <= set(TrainConfig.model_fields)
    assert TrainConfig().model_dump(include=set(OSPOLossConfig.model_fields)) == OSPOLossConfig().model_dump()
    _refused(RoundConfig, {"train": {"label_smoothing": 0.5}}, "train.label_smoothing")


# ---------------------------------------------------------------- values that could only fail later


@pytest.mark.parametrize("path", ["train.seed", "render.seed", "prompts.seed", "questions.seed"])
def test_negative_seed_is_refused(path):
    _refused(RoundConfig, _nested(path, -1), path)


@pytest.mark.parametrize("path", ["train.seed", "render.seed"])
def test_seed_beyond_32_bits_is_refused(path):
    _refused(RoundConfig, _nested(path, 2**32), path)
    section = getattr(RoundConfig.model_validate(_nested(path, 2**32 - 1)), path.split(".")[0])
    assert section.seed == 2**32 - 1  # the largest seed numpy accepts


def test_seed_lists_are_checked_per_seed():
    _refused(RoundConfig, {"perturb": {"seeds": [0, -1, 2]}}, "perturb.seeds.1")
    _refused(ShapesAblationConfig, {"seeds": [0, 2**40]}, "seeds.1")
    _refused(EvalConfig, {"seed": -5}, "seed")


def _float_fields(model: type[BaseModel], prefix: str = ""):
    """Dotted paths of every float field in a config tree."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        default = info.get_default(call_default_factory=True, validated_data={})
        if isinstance(default, BaseModel):  # a section (its annotation may still be a forward reference)
            yield from _float_fields(type(default), f"{prefix}{name}.")
        elif annotation is float or float in get_args(annotation):
            yield f"{prefix}{name}"


FLOAT_PATHS = sorted(set(_float_fields(SelfImproveConfig)) | {f"round.{p}" for p in _float_fields(RoundConfig)})
PRETRAIN_FLOAT_PATHS = [p for p in _float_fields(ShapesAblationConfig) if p.startswith("pretrain.")]


def test_the_float_walk_finds_the_fields_of_the_issue():
    assert {"round.train.simpo_beta", "round.render.cfg_weight", "eval.cfg_weight", "gate.min_improvement",
            "round.execution.gpus_per_worker"} <= set(FLOAT_PATHS)
    assert "pretrain.caption_noise" in PRETRAIN_FLOAT_PATHS


@pytest.mark.parametrize("model, path", [(SelfImproveConfig, p) for p in FLOAT_PATHS]
                         + [(ShapesAblationConfig, p) for p in PRETRAIN_FLOAT_PATHS])
def test_infinity_is_refused_in_every_float_field(model, path):
    _refused(model, _nested(path, math.inf), path)


@pytest.mark.parametrize("value", [math.nan, "NaN", "Infinity", "-inf"])
def test_nan_and_spelled_infinities_are_refused(value):
    """`--set train.simpo_beta=Infinity` reaches the config as the string; YAML's .nan as a float."""
    message = _refused(RoundConfig, {"train": {"simpo_beta": value}}, "train.simpo_beta")
    assert "finite" in message


@pytest.mark.parametrize("round_id", ["a..b", "..", "x/../y", "../etc"])
def test_round_id_that_walks_out_of_the_runs_folder_is_refused(round_id):
    message = _refused(RoundConfig, {"round_id": round_id}, "round_id")
    assert "'..'" in message
    assert RoundConfig(round_id="round.003").round_id == "round.003"


@pytest.mark.parametrize("path", ["train.max_steps", "train.save_steps", "train.logging_steps",
                                  "prompts.rotation_interval", "prompts.max_len", "prompts.quotas.color1"])
def test_absurd_step_counts_are_refused(path):
    _refused(RoundConfig, _nested(path, 10**12), path)
    assert RoundConfig.model_validate({"train": {"max_steps": 1_000_000}}).train.max_steps == 1_000_000


# ---------------------------------------------------------------- paper and v3 presets against the spec


def test_paper_preset_matches_the_spec():
    from ospo_core.config import PRESETS, SelfImproveConfig

    cfg = RoundConfig.model_validate(PRESETS["paper"])
    t = cfg.train
    # spec section 4: 8 pairs per GPU x 4 GPUs x 4 accumulation = 128 pairs per optimizer step, 500 steps
    assert (t.pairs_per_step, t.max_steps, t.batch_size) == (128, 500, 8)
    assert [t.accumulation(n) for n in (1, 4, 16)] == [16, 4, 1]
    # the PNG re-encoded by the VQ encoder is what selection scores and training trains on
    assert cfg.select.token_source == "reencode" and cfg.select.rule == "v2" and cfg.select.margin == 0.5
    assert (t.simpo_beta, t.simpo_gamma_ratio, t.copo_beta, t.copo_gamma_ratio) == (3.0, 0.5, 5.0, 0.5)
    assert (t.simpo_weight, t.copo_weight, t.sft_weight, t.object_weighting) == (0.8, 0.5, 1.5, False)
    assert (t.lora_r, t.lora_alpha, t.lora_dropout, t.learning_rate) == (32, 64, 0.05, 1e-5)
    assert (t.adam_beta1, t.adam_beta2, t.lr_scheduler, t.max_grad_norm) == (0.9, 0.95, "constant", 1.0)
    assert (t.eval_steps, t.logging_steps, t.seed) == (50, 5, 42)  # authors validate every 50 steps
    assert (cfg.render.cfg_weight, cfg.render.temperature) == (5.0, 1.0)
    # DPO's usual 0.1 per summed sequence of 576 image tokens, on the mean log-ratio
    assert t.dpo_beta == pytest.approx(0.1 * 576)
    loop = SelfImproveConfig()
    assert loop.lineage == "latest" and loop.eval.judge == "fixed" and cfg.vqa.judge == "self"


def test_v3_preset_matches_the_v3_settings():
    from ospo_core.config import PRESETS

    cfg = RoundConfig.model_validate(PRESETS["v3"])
    t = cfg.train
    assert (cfg.select.rule, cfg.select.min_chosen_score) == ("v3", 0.6)
    assert (t.object_weighting, t.mask_alpha, t.mask_gamma) == (True, 1.0, 1.0)
    assert (t.simpo_beta, t.simpo_gamma_ratio, t.simpo_weight, t.copo_weight, t.sft_weight) == (5.0, 0.5, 1.0, 0.0, 2.0)
    assert (t.lora_r, t.lora_alpha) == (64, 128)
    # 16 per GPU x 8 GPUs x 2 accumulation = 256 pairs per step
    assert (t.pairs_per_step, t.batch_size, t.accumulation(8)) == (256, 16, 2)
    assert (t.lr_scheduler, t.learning_rate, t.warmup_ratio, t.min_lr, t.max_steps) == ("cosine", 1e-5, 0.05, 1e-7, 1000)
    assert (cfg.perturb.temperature, cfg.densify.temperature, cfg.perturb.top_p) == (1.0, 1.0, 0.9)


def test_a_step_that_does_not_divide_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="pairs_per_step 128 is not a multiple of batch_size 6 x 1 process"):
        TrainConfig(batch_size=6).accumulation(1)
    assert TrainConfig(batch_size=6, gradient_accumulation_steps=3).accumulation(4) == 3  # explicit wins
    with pytest.raises(ValidationError, match="not a multiple of batch_size 8 x 3 process"):  # when the round is read
        RoundConfig.model_validate({"execution": {"num_processes": 3}})
