"""Pydantic configuration for every stage and for a whole round.

These models are validated at the edge (CLI, Prefect UI form) and are the Prefect flow parameters, so every knob has
a description that states its trade-off and a range; an invalid value is refused with the field's name. A value
that could only fail later (a negative seed, an infinite scale, a million-year step count) is refused here too.

Each concept is declared once: a field shared by several stages lives in a base class or an annotated type below,
and a stage states only its own default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ospo_core import store


class StageConfig(BaseModel):
    """Base for all configs: unknown keys are errors (a typo must not silently fall back to a default), and no float
    field accepts inf or NaN (they pass every range check below and fail deep inside a stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False,
                              json_schema_extra=lambda schema, cls: _ranges_in_descriptions(schema))


_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))


def _ranges_in_descriptions(schema: dict) -> None:
    """Each property's range, appended to its description: the Prefect run form shows descriptions, not bounds."""
    for prop in schema.get("properties", {}).values():
        # an optional field keeps its bounds in the non-null branch of anyOf
        bounded = [prop, *prop.get("anyOf", []), prop.get("additionalProperties") or {}]
        bounds = [f"{sign} {_number(b[key])}" for b in bounded if isinstance(b, dict)
                  for key, sign in _BOUNDS if key in b]
        if bounds and "description" in prop and "Range:" not in prop["description"]:
            prop["description"] += f" Range: {', '.join(bounds)}."


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


Fallback = Literal["none", "structured"]
# numpy's and transformers' set_seed accept 0 .. 2**32 - 1; anything else would fail only when a stage starts.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
# A cap on every count of steps or draws: far above any real run, low enough that a typo (10**12) is refused.
MAX_STEPS = 1_000_000


class SelectConfig(StageConfig):
    """Stage 3c-3e: which scored images become a (chosen, rejected) pair and which negative prompt goes with it."""

    rule: Literal["v2", "v1", "v3"] = Field(
        "v2",
        description="v2 (the paper): VQA-filtered candidates, chosen = best local score, rejected image and rejected "
        "prompt = the hardest negative by image log-likelihood (needs the model). v1: same-index pairs ranked by "
        "preference strength (needs a global question last). v3: same-index pairs, chosen local score >= "
        "min_chosen_score; no model calls.",
    )
    margin: float = Field(
        0.5,
        ge=-1.0,
        lt=1.0,
        description="v2 filter margin: a chosen image needs p_yes - p_no > margin on every question, a rejected image "
        "(or rejected prompt) p_no - p_yes > margin on at least one. Higher = cleaner pairs but fewer items kept; "
        "-1 turns the filter off (only for a judge that knows nothing, like the random tiny model).",
    )
    min_chosen_score: float = Field(
        0.6,
        ge=-1.0,
        le=1.0,
        description="v3: a chosen image needs a local score (mean p_yes - p_no) of at least this. Higher = more "
        "faithful chosen images but fewer pairs.",
    )
    token_source: Literal["reencode", "sampled"] = Field(
        "reencode",
        description="Which image tokens the round scores (v2's log-likelihoods), masks and trains on; the pairs table "
        "carries them, so selection, masks and training always use the same ones. reencode (the paper, the authors' "
        "code): the saved PNG re-encoded by the VQ encoder. sampled: the ids the sampler drew (on-policy, exact, no "
        "encoder pass; needed where the PNG is not a VQ image, like the shapes-world testbed).",
    )


class OSPOLossConfig(StageConfig):
    """Stage 4's objective (spec section 4; defaults = paper v2), read by `ospo_core.train.loss.ospo_loss`:

        L = mean_batch(simpo_weight·L_S + copo_weight·L_C) + sft_weight·L_SFT
        L_S = -log σ(β₁·(ℓ(x_c, y_w) - ℓ(x_c, y_l) - r₁)),   L_C = -log σ(β₂·(ℓ(x_c, y_w) - ℓ(x_r, y_w) - r₂))

    with ℓ the length-normalised image log-likelihood and the target margins γ = β·r. A weight of 0 drops its term.
    """

    loss: Literal["ospo", "dpo"] = Field(
        "ospo",
        description="ospo: reference-free SimPO + conditional preference + SFT (the paper). dpo: the pair term is "
        "sigmoid DPO against the frozen start model (adapter disabled); costs one extra no-grad forward per step.",
    )
    simpo_beta: float = Field(3.0, gt=0, description="beta1: scale of the SimPO margin. Higher = sharper preference.")
    simpo_gamma_ratio: float = Field(
        0.5, ge=0, description="gamma1/beta1: target log-likelihood margin between chosen and rejected images."
    )
    copo_beta: float = Field(5.0, gt=0, description="beta2: scale of the conditional-preference margin.")
    copo_gamma_ratio: float = Field(
        0.5, ge=0, description="gamma2/beta2: target margin between the chosen image under its prompt and under the "
        "rejected prompt."
    )
    dpo_beta: float = Field(
        57.6, gt=0, description="beta of the dpo option, on the length-normalised log-ratio (mean over the 576 image "
        "tokens): 57.6 = DPO's usual 0.1 on the summed log-ratio x 576. simpo_beta (3) there would be 0.005 per "
        "summed sequence: almost no signal."
    )
    simpo_weight: float = Field(0.8, ge=0, description="Weight of the SimPO (or DPO) pair term; 0 disables it.")
    copo_weight: float = Field(0.5, ge=0, description="Weight of the conditional preference term; 0 disables it (v3).")
    sft_weight: float = Field(1.5, ge=0, description="Weight of the chosen-image NLL; keeps the model on its own "
                              "distribution while the margins grow.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="epsilon: assumed probability that a pair's "
                                   "preference label is flipped (the conservative pair loss); 0 = paper.")


class TrainConfig(OSPOLossConfig):
    """Stage 4: object-centric preference optimization (LoRA on the language model; spec section 4, v2 defaults).
    The objective's fields come from OSPOLossConfig, so this config is the loss config the trainer uses."""

    object_weighting: bool = Field(
        False, description="v3 option: weight image tokens inside the object mask (from the masks stage) by "
        "1 + mask_alpha * M' in the pair terms. Needs the masks table; a pair without both masks is skipped (spec) "
        "and counted in the training history (pairs/skipped_no_mask)."
    )
    mask_alpha: float = Field(1.0, ge=0, description="Extra weight on object tokens when object_weighting is on.")
    mask_gamma: float = Field(1.0, gt=0, description="Power applied to the blurred mask; > 1 sharpens it.")
    lora_r: int = Field(32, ge=1, le=1024, description="LoRA rank. Higher = more capacity and memory.")
    lora_alpha: int = Field(64, ge=1, le=65536, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    learning_rate: float = Field(1e-5, gt=0, le=1, description="AdamW learning rate (paper: 1e-5).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2 (paper: 0.95).")
    lr_scheduler: Literal["constant", "cosine"] = Field(
        "constant", description="constant (paper v2) or linear warmup then cosine down to min_lr."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up (cosine).")
    min_lr: float = Field(1e-6, ge=0, description="Final learning rate of the cosine schedule.")
    max_steps: int = Field(500, ge=1, le=MAX_STEPS, description="Optimizer steps. Paper: 500 steps of 128 pairs.")
    pairs_per_step: int = Field(128, ge=1, le=1_000_000, description="Pairs per optimizer step over all processes "
                                "(paper: 8 per GPU x 4 GPUs x 4 accumulation = 128); gradient accumulation is derived "
                                "from it, so the step is the same on 1 GPU or 16. Larger = smoother, fewer steps per "
                                "epoch.")
    batch_size: int = Field(8, ge=1, le=4096, description="Pairs per device per micro-batch (each pair = 3 "
                            "sequences). A CUDA out-of-memory error shrinks it and raises gradient accumulation to "
                            "match.")
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, le=4096, description="Micro-batches per optimizer step. None (default) = derived: pairs_per_step "
        "/ (batch_size x processes). A number overrides it, and the step then holds batch_size x this x processes "
        "pairs.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: ~30% slower, far less memory."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU."
    )
    save_steps: int = Field(50, ge=1, le=MAX_STEPS, description="Checkpoint every N optimizer steps (resume point).")
    logging_steps: int = Field(5, ge=1, le=MAX_STEPS, description="Log metrics every N optimizer steps.")
    seed: Seed = Field(42, description="Seed for LoRA init and data order.")
    validation_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of the round's pairs held out (by a stable hash of item_id) and "
        "validated on every eval_steps steps: loss terms, margins, accuracies (eval_* in the history). 0 = no "
        "validation, every pair trains. At least one pair is held out when > 0 and the round has 2 or more.")
    eval_steps: int = Field(50, ge=1, le=MAX_STEPS, description="Validate every N optimizer steps (authors: 50).")

    def accumulation(self, num_processes: int = 1) -> int:
        """Micro-batches per optimizer step on `num_processes` processes: the explicit value, or pairs_per_step /
        (batch_size x num_processes), which must divide exactly."""
        if self.gradient_accumulation_steps is not None:
            return self.gradient_accumulation_steps
        per_micro_step = self.batch_size * num_processes
        if self.pairs_per_step % per_micro_step:
            raise ValueError(
                f"train.pairs_per_step {self.pairs_per_step} is not a multiple of batch_size {self.batch_size} x "
                f"{num_processes} process(es); choose a batch_size (or process count) that divides it, or set "
                f"train.gradient_accumulation_steps")
        return self.pairs_per_step // per_micro_step


# The twelve prompt-generation runs of stage 1, in the fixed order that numbers item ids, with the spec's quotas
# (6 x 667 attribute + 4 x 1000 layout + 4000 non-spatial + 4000 complex = 16,002 prompts).
PromptSubCategory = Literal[
    "color1", "color2", "shape1", "shape2", "texture1", "texture2",
    "2D_spatial", "3D_spatial", "numeracy1", "numeracy2", "non-spatial", "complex",
]
SPEC_QUOTAS: dict[str, int] = {
    "color1": 667, "color2": 667, "shape1": 667, "shape2": 667, "texture1": 667, "texture2": 667,
    "2D_spatial": 1000, "3D_spatial": 1000, "numeracy1": 1000, "numeracy2": 1000,
    "non-spatial": 4000, "complex": 4000,
}
# Stage 2a/2b reset the sampler to seed_list[i] for perturbation index i.
SPEC_PERTURBATION_SEEDS = (0, 1, 2)


# The knobs every text-writing call shares; each stage gives its own (the spec's) default.
Temperature = Annotated[float, Field(gt=0, le=5, description="Sampling temperature (the default is the spec's). "
                                     "Higher = bolder, more varied text, more format breaks.")]
TopP = Annotated[float, Field(gt=0, le=1, description="Nucleus cut (the default is the spec's; 1 = none). Lower = "
                              "safer text that stays closer to the prompt's own words, less varied.")]
MaxNewTokens = Annotated[int, Field(ge=1, le=4096, description="Token budget per answer (the default is the "
                                    "spec's). Too low cuts an answer before its end (a final marker, a question "
                                    "list); lower saves time on rambling samples.")]

# A batch size, or "auto": by free device memory on a GPU, small on a CPU (ospo_core.janus.memory).
BatchSize = Annotated[int, Field(ge=1, le=4096)] | Literal["auto"]


class _TextSamplingConfig(StageConfig):
    """What the text stages (1, 2a, 2b, 3a) share: batching, sampling and the structured fallback switch. The
    sampling defaults are stage 1's; the other stages override them with their own spec values."""

    batch_size: BatchSize = Field("auto", description="Chats decoded together (continuous batching: a finished "
                                  "chat's row takes the next one). auto: by free memory on a GPU (up to 256), 16 on "
                                  "a CPU. Larger = faster until memory runs out; results do not depend on it.")
    fallback: Fallback = Field(
        "none",
        description="none (paper-faithful): what the model fails to write stays missing: a failed row keeps ok=False "
        "and its reason, a prompt sub-category that misses its quota stays short. structured: build the missing "
        "text from the structured columns instead (prompts: from a built-in grammar and vocabulary), marked "
        "source='fallback' (for weak or tiny models).",
    )
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    max_new_tokens: MaxNewTokens = 512


class PromptsConfig(_TextSamplingConfig):
    """Stage 1: the model writes its own base prompts, one few-shot chat per sub-category."""

    sub_categories: tuple[PromptSubCategory, ...] = Field(
        tuple(SPEC_QUOTAS),
        min_length=1,
        description="Which of the 12 prompt-generation runs to do (all by default). Item ids are numbered in the "
        "spec's fixed order whichever runs are chosen.",
    )
    quotas: dict[PromptSubCategory, Annotated[int, Field(ge=1, le=MAX_STEPS)]] = Field(
        default_factory=lambda: dict(SPEC_QUOTAS),
        description="Accepted prompts wanted per sub-category (spec: 667 per attribute, 1000 per layout, 4000 "
        "non-spatial, 4000 complex). A partial mapping overrides only the keys it names; to skip a run, leave it "
        "out of sub_categories. More prompts = more training pairs, proportionally more generation time.",
        # one integer field per sub-category in the run form (a plain mapping would be one JSON text box there)
        json_schema_extra={"properties": {key: {"type": "integer", "minimum": 1, "maximum": MAX_STEPS, "title": key}
                                          for key in SPEC_QUOTAS}},
    )
    max_len: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Cap on every sub-category's quota (the authors' demo config uses 30). None = quotas as given.",
    )
    repeat: int = Field(
        8,
        ge=1,
        le=1024,
        description="Samples drawn per step from the same chat (spec: 8). Larger = fewer steps per rotation, so "
        "the few-shot examples change less often per accepted prompt.",
    )
    max_draws_per_item: float = Field(
        4.0,
        ge=1.0,
        description="A sub-category stops after ceil(quota x this) draws even if its quota is not met, so a weak "
        "model ends. Higher = fewer shortfalls from a model that often breaks the format, at more generation cost.",
    )
    rotation_interval: int = Field(
        100,
        ge=1,
        le=MAX_STEPS,
        description="Every this many steps the few-shot examples are redrawn from the prompts accepted so far "
        "(spec: 100; 5 shots for complex, else 3). Smaller = more diverse but more self-referential prompts.",
    )
    seed: Seed = Field(42, description="Base seed; each draw's seed is a stable hash of (seed, sub-category, draw).")

    def quota_for(self, key: str) -> int:
        """Accepted prompts wanted from run `key`; 0 when the run is not in sub_categories."""
        if key not in self.sub_categories:
            return 0
        quota = self.quotas[key]
        return quota if self.max_len is None else min(quota, self.max_len)

    @field_validator("quotas", mode="before")
    @classmethod
    def _fill_spec_quotas(cls, value):
        # A UI form or YAML usually names only the sub-categories it changes.
        return {**SPEC_QUOTAS, **value} if isinstance(value, dict) else value


class _PerIndexSamplingConfig(_TextSamplingConfig):
    """Stages 2a and 2b sample once per perturbation index k, with the spec's per-index seeds and settings; their
    step-by-step answers end in a final marker that too low a max_new_tokens cuts off."""

    seeds: tuple[Seed, Seed, Seed] = Field(
        SPEC_PERTURBATION_SEEDS,
        description="Seed of perturbation index k (spec: 0, 1, 2 for both 2a and 2b); a row's seed is a stable hash "
        "of (seeds[k], item_id), so samples do not depend on batching or sharding.",
    )
    temperature: Temperature = 1.2
    top_p: TopP = 0.9


class PerturbConfig(_PerIndexSamplingConfig):
    """Stage 2a: one object-level hard negative per (base prompt, perturbation index k = 0, 1, 2)."""


class DensifyConfig(_PerIndexSamplingConfig):
    """Stage 2b: dense (long) versions of each base prompt and its negative, written together in one call."""


class QuestionsConfig(_TextSamplingConfig):
    """Stage 3a: decompositional yes/no questions for each short base prompt and each short negative prompt."""

    seed: Seed = Field(42, description="Base seed (spec 42); a row's seed is a stable hash of (seed, item_id, k).")
    temperature: Temperature = 1.2
    top_p: TopP = 0.5  # keeps the questions close to the prompt's own words
    max_new_tokens: MaxNewTokens = 256


CompileMode = Literal["auto", "eager", "default", "reduce-overhead", "max-autotune"]


class ImageSamplingConfig(StageConfig):
    """How images are drawn (the classifier-free-guidance sampler): one declaration shared by rendering (stage 2c)
    and the held-out evaluation, so a round and its evaluation sample alike unless a user sets them apart."""

    cfg_weight: float = Field(5.0, ge=0, le=50, description="Classifier-free guidance weight w (paper: 5). Higher "
                              "= closer to the prompt, less diverse; 1 = no guidance.")
    temperature: float = Field(1.0, gt=0, le=5, description="Sampling temperature of image tokens (paper: 1).")
    seed: Seed = Field(0, description="Base seed; image k of an item (or of a held-out prompt) is drawn with a seed "
                       "derived from (seed, its id, k): a pair's base and negative sides share their noise, and two "
                       "models are evaluated on the same noise, so they differ only by the prompt or the model.")
    batch_size: BatchSize = Field("auto", description="Prompts per sampler batch (each is 2 rows for guidance; an "
                                  "evaluation also judges this many images per self-VQA batch). auto: by free memory "
                                  "on a GPU (up to 256; CUDA graphs near the bandwidth bound from 64), 16 on a CPU. "
                                  "Larger = faster on a GPU until memory runs out; a CUDA out-of-memory halves it.")
    compile_mode: CompileMode = Field(
        "auto",
        description="torch.compile mode of the sampler's per-token step. auto: CUDA graphs (reduce-overhead) on a "
        "GPU, where eager steps are launch-bound (2.2-4.3x faster at 64 images on an H200, about a minute to "
        "compile), eager on the CPU, where compiling costs more than it saves.",
    )


class RenderConfig(ImageSamplingConfig):
    """Stage 2c: images for the base and negative dense prompts (one image per side and perturbation index)."""


# The judges (ospo_core.plugins.JUDGES) a stage or an evaluation may choose, and where a judge's weights live.
_JUDGES_TEXT = (
    "self: the model being trained or evaluated answers from the PNG (the paper). fixed: a frozen Janus that does not "
    "change during the round (the round's start model, or judge_model). geneval: GenEval's rules over an object "
    "detector and CLIP (judge_model holds detector/ and clip/). vqa: a VQA model such as BLIP-VQA, as T2I-CompBench "
    "scores attribute binding, plus CLIPScore for non-spatial prompts (judge_model holds vqa/ and clip/).")
JudgeModel = Annotated[str | None, Field(description="Local folder of the judge's weights (nothing is downloaded): "
                                         "fixed: a Janus checkpoint folder or 'tiny' (default: the round's start "
                                         "model); geneval: a folder with detector/ and clip/; vqa: a folder with vqa/ "
                                         "and clip/ (transformers format); self_grid: a testbed checkpoint folder "
                                         "that answers instead of the round's model (default: the round's model). "
                                         "Unused by self and oracle.")]


class VQAConfig(StageConfig):
    """Stage 3b: the model answers its own decompositional questions on every image (yes/no probabilities)."""

    batch_size: BatchSize = Field("auto", description="Images per scoring batch; each image's prefix is computed "
                                  "once and its questions are packed behind it. auto: by free memory on a GPU, 16 on "
                                  "a CPU.")
    judge: Literal["self", "fixed", "geneval", "vqa", "oracle", "self_grid"] = Field(
        "self",
        description=_JUDGES_TEXT + " oracle: the shapes-world testbed reads the image tokens and answers exactly "
        "(p = 1/0); self_grid: the testbed model answers from its PNG re-encoded to scene cells (ospo_core.testbed.judge). Both only for testbed checkpoints, whose image tokens are scene cells. Within a round the model does "
        "not change before training, so self and fixed (start model) answer alike here.",
    )
    judge_model: JudgeModel = None


class MasksConfig(StageConfig):
    """Object masks for the v3 object-weighted loss, from the model's own attention (runs when
    train.object_weighting is on)."""

    layer_skip: int = Field(
        5, ge=0, description="Attention of this many first and last LM layers is ignored (spec: layers 5-24 of 30); "
        "clamped so at least one layer remains on small models.",
    )
    otsu_scale: float = Field(0.8, gt=0, le=2, description="Binary threshold = this x Otsu's threshold on the "
                              "normalised attention map. Lower = larger masks.")
    batch_size: int = Field(4, ge=1, le=256, description="Images per attention pass (eager attention is memory-hungry).")


# The pattern is in the run form's schema, so the server refuses a bad id before a worker starts; here the store's
# check validates, as its message names '..' and path separators.
RoundId = Annotated[str, Field(json_schema_extra={"pattern": f"^{store._ROUND_ID.pattern}$"}),
                    AfterValidator(store.check_round_id)]


class RoundConfig(StageConfig):
    """One OSPO self-improvement round: the model writes prompts, builds hard negatives, draws and judges images,
    selects preference pairs and trains a LoRA adapter on them. These fields are the Prefect run form."""

    round_id: RoundId | None = Field(
        None, description="Folder name under OSPO_HOME/runs (1-128 letters, digits, '.', '_' or '-', no '..'); "
        "empty = a new id from the date and time. Reuse an id to resume or re-run a round: finished stages are "
        "cache hits, finished shards are skipped.",
    )
    model: str = Field("tiny", description="'tiny' (built-in random model, for demos and tests) or a local folder "
                       "with a transformers-format Janus checkpoint.")
    adapters: list[str] = Field(default_factory=list, description="LoRA adapters of earlier rounds, merged in order "
                                "before this round starts (the self-improvement flow fills this in).")
    world: Literal["paper", "shapes"] = Field(
        "paper",
        description="Who writes the text and draws the pictures. paper (the method): the model writes the prompts, "
        "negatives, dense rewrites and questions, and its VQ decoder draws the PNGs. shapes: the shapes-world testbed "
        "(ospo_core.testbed) writes the text from its grammar (only its sub-categories, see TESTBED_SUB_CATEGORIES) "
        "and draws the token grids, for checkpoints made by `ospo testbed`, whose VQ decoder is untrained. The model "
        "draws the image tokens and trains in both.",
    )
    shard_rows: int = Field(64, ge=1, le=100_000, description="Rows per Parquet shard of the rendering and self-VQA "
                            "stages: the unit of resume after a crash. Smaller = less lost work, more files.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Stage 1: initial prompt generation.")
    perturb: PerturbConfig = Field(default_factory=PerturbConfig, description="Stage 2a: object-level negatives.")
    densify: DensifyConfig = Field(default_factory=DensifyConfig, description="Stage 2b: dense rewrites.")
    render: RenderConfig = Field(default_factory=RenderConfig, description="Stage 2c: images for both sides.")
    questions: QuestionsConfig = Field(default_factory=QuestionsConfig, description="Stage 3a: decompositional "
                                       "questions.")
    vqa: VQAConfig = Field(default_factory=VQAConfig, description="Stage 3b: self-VQA scoring.")
    select: SelectConfig = Field(default_factory=SelectConfig, description="Stage 3c/3d: pair selection.")
    masks: MasksConfig = Field(default_factory=MasksConfig, description="v3 option: object masks.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Stage 4: preference optimization.")
    # ExecutionConfig is defined below (appended with the scale-out work): the lambda looks it up when called.
    execution: ExecutionConfig = Field(default_factory=lambda: ExecutionConfig(), description="Where the model "
                                       "stages run (this process or a Ray cluster) and how many processes train.")

    @model_validator(mode="after")
    def _step_divides(self):
        self.train.accumulation(self.execution.num_processes)  # refused now, not after hours of generation
        return self


# A round that finishes in a few minutes on 2 CPU cores with the tiny model: a few prompts per sub-category,
# short text budgets, structured fallbacks (the tiny model writes nonsense), a short training run.
DEMO_OVERRIDES: dict = {
    "prompts": {"max_len": 2, "repeat": 4, "max_draws_per_item": 2.0, "max_new_tokens": 24, "fallback": "structured"},
    "perturb": {"max_new_tokens": 24, "fallback": "structured"},
    "densify": {"max_new_tokens": 24, "fallback": "structured"},
    "questions": {"max_new_tokens": 24, "fallback": "structured"},
    "select": {"rule": "v2", "margin": -1.0},  # the random model's answers carry no signal
    "train": {"max_steps": 8, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
              "save_steps": 4, "logging_steps": 1, "gradient_checkpointing": False},
    "shard_rows": 16,
}

# The prompt sub-categories the shapes world has captions for (ospo_core.testbed.world).
TESTBED_SUB_CATEGORIES = ("color1", "color2", "2D_spatial", "numeracy1", "numeracy2", "complex")
# A round on the shapes-world testbed (`model` = a checkpoint made by `ospo testbed`): the world writes the text,
# the oracle judges the drawn grids, the model draws and trains. Seconds per round on 2 CPU cores. Quotas favour the
# large caption spaces (color1 and numeracy1 have only 9 and 27 training captions). Guidance is off (w = 1): no
# round trains the unconditional branch, and with w = 5 the guided distribution drifted with it (TESTBED.md).
TESTBED_OVERRIDES: dict = {
    "world": "shapes",
    "prompts": {"sub_categories": list(TESTBED_SUB_CATEGORIES),
                "quotas": {"color1": 9, "color2": 50, "2D_spatial": 96, "numeracy1": 27, "numeracy2": 96,
                           "complex": 96}},
    "vqa": {"judge": "oracle", "batch_size": 64},
    # margin 0 (answers "yes" / "no", not confidence 0.75): the testbed model's own judge is rarely that confident
    # about a whole question set (2-3 pairs a round at 0.5, TESTBED.md); the oracle's 1/0 selects the same either way
    "select": {"token_source": "sampled", "margin": 0.0},  # the tokens are scene cells; the PNG is a drawing of them, not a VQ image
    "render": {"cfg_weight": 1.0, "batch_size": 64},
    # lr 2.5e-4: at 5e-4 self-judged rounds gave back their gain from round 2 on (TESTBED.md)
    "train": {"max_steps": 80, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 2.5e-4,
              "lora_r": 16, "lora_alpha": 32, "save_steps": 80, "logging_steps": 10, "gradient_checkpointing": False,
              "validation_fraction": 0.0},  # the ablation measures held-out captions itself; every pair trains
    "shard_rows": 4096,
}
# The authors' 2026 (v3) settings (spec section 6): same-index pairs with a chosen score >= 0.6, object-weighted
# SimPO (beta 5, r 0.5) + 2 x SFT without the conditional term, LoRA 64/128, 256 pairs per step, cosine from 1e-5 to
# 1e-7 with 5% warmup, 1000 steps, negatives and dense rewrites sampled at temperature 1.0.
V3_OVERRIDES: dict = {
    "perturb": {"temperature": 1.0, "top_p": 0.9},
    "densify": {"temperature": 1.0, "top_p": 0.9},
    "select": {"rule": "v3", "min_chosen_score": 0.6},
    "train": {"object_weighting": True, "mask_alpha": 1.0, "mask_gamma": 1.0, "simpo_beta": 5.0,
              "simpo_gamma_ratio": 0.5, "simpo_weight": 1.0, "copo_weight": 0.0, "sft_weight": 2.0, "lora_r": 64,
              "lora_alpha": 128, "pairs_per_step": 256, "batch_size": 16, "learning_rate": 1e-5,
              "lr_scheduler": "cosine", "warmup_ratio": 0.05, "min_lr": 1e-7, "max_steps": 1000, "save_steps": 100},
}
# `make run` (`ospo run --model testbed`): one testbed round on the shipped start model with the model judging its
# own drawings (ospo_core.testbed.judge; ~90% agreement with the oracle on balanced held-out questions).
TESTBED_DEMO_OVERRIDES: dict = {**TESTBED_OVERRIDES, "vqa": {"judge": "self_grid", "batch_size": 64}}
PRESETS: dict[str, dict] = {"paper": {}, "demo": DEMO_OVERRIDES, "testbed": TESTBED_OVERRIDES, "v3": V3_OVERRIDES,
                            "testbed-demo": TESTBED_DEMO_OVERRIDES}


def _leaves(document: dict, prefix: str = "") -> dict[str, object]:
    """{"train.max_steps": 8, ...}: every value of a nested document by its dotted path (a dict of quotas too)."""
    out = {}
    for key, value in document.items():
        if isinstance(value, dict) and value:
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def preset_config(preset: str) -> "RoundConfig":
    return RoundConfig.model_validate(PRESETS[preset])


def apply_preset(config: "RoundConfig", preset: str, form: str = "demo") -> "RoundConfig":
    """The run form's meaning: `config` starts as preset `form`; every field left at that preset's value takes the
    value of `preset` instead, every field changed keeps its new value. `apply_preset(c, form)` is `c` itself."""
    if preset == form:
        return config
    base = _leaves(preset_config(form).model_dump(mode="json"))
    document = preset_config(preset).model_dump(mode="json")
    for path, value in _leaves(config.model_dump(mode="json")).items():
        if base.get(path, object()) != value:
            node = document
            *parents, last = path.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
    return RoundConfig.model_validate(document)


def nearest_preset(config: "RoundConfig") -> tuple[str, list[str]]:
    """(the preset with the fewest differing fields, those fields' dotted paths), `round_id` and `model` aside."""
    mine = _leaves(config.model_dump(mode="json", exclude={"round_id", "model", "adapters"}))
    best = None
    for name in PRESETS:
        theirs = _leaves(preset_config(name).model_dump(mode="json", exclude={"round_id", "model", "adapters"}))
        changed = sorted(p for p in mine.keys() | theirs.keys() if mine.get(p) != theirs.get(p))
        if best is None or len(changed) < len(best[1]):
            best = (name, changed)
    return best


def deep_update(base: dict, overrides: dict) -> dict:
    """Nested dict merge: overrides win, sub-dicts merge key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class EvalConfig(ImageSamplingConfig):
    """Held-out evaluation: images for a benchmark's prompts, drawn with the same sampling settings as a round's
    render stage (ImageSamplingConfig), answered by `judge` (fixed by default: a round's start model). The self and
    fixed judges' numbers track models across rounds and are not comparable with published benchmark scores; the
    geneval judge applies GenEval's own rules when its folder holds GenEval's models.
    """

    prompt_set: str = Field(
        "geneval",
        min_length=1,
        description="'t2i-compbench' (8 categories of validation prompts), 'geneval' (553 prompts with object, count, "
        "colour and position metadata, judged per tag) or the path of a file: one prompt per line, or JSONL with a "
        "'prompt' field and optional 'category', 'tag' and GenEval-style 'include'/'exclude'.",
    )
    limit: int | None = Field(
        None, ge=1, description="First N prompts of each category (file order); None = all. Fewer prompts = a faster "
        "but noisier evaluation, so a promotion gate needs a larger threshold."
    )
    images_per_prompt: int = Field(
        4, ge=1, le=64, description="Images drawn per prompt (GenEval draws 4). More = a steadier metric, "
        "proportionally more sampling time."
    )
    questions: QuestionsConfig = Field(
        default_factory=QuestionsConfig,
        description="How prompts without metadata get their decompositional questions (the stage-3a questions "
        "stage); fallback='structured' reads objects, attributes, counts and relations from the prompt text with "
        "the built-in and GenEval vocabularies when the model's answer does not parse (weak or tiny models). "
        "GenEval metadata is turned into questions directly, without the model.",
    )
    shard_rows: int = Field(64, ge=1, le=100_000, description="Prompts per Parquet shard of the eval table: the "
                            "unit of resume after a crash.")
    judge: Literal["self", "fixed", "geneval", "vqa"] = Field(
        "fixed",
        description=_JUDGES_TEXT + " Default fixed: a round's start model judges both its own and the trained "
        "model's images, so a round cannot raise its score by teaching the model to say yes; a model outside the "
        "rounds is its own fixed judge.",
    )
    judge_model: JudgeModel = None


class GateConfig(StageConfig):
    """Promotion gate of the self-improvement loop: a round is promoted (the next round starts from it) only when
    its held-out evaluation improved on the model it started from and no category got much worse."""

    metric: Literal["mean_score", "all_yes"] = Field(
        "mean_score",
        description="mean_score: mean over categories of the mean image score (by default p_yes - p_no averaged "
        "over an image's questions); smooth, so it moves with few prompts. all_yes: mean over categories of the "
        "fraction of images whose every answer is yes (GenEval's pass rate under the chosen judge); coarse, needs "
        "more prompts.",
    )
    min_improvement: float = Field(
        0.01, ge=-2, le=2, description="Promote only if the metric rises by at least this (after - before). Higher "
        "= fewer promotions of noise, but a real small gain can be refused; 0 = promote when not worse."
    )
    max_category_drop: float = Field(
        0.05, ge=0, le=2, description="Refuse promotion when any category's metric falls by more than this, even if "
        "the overall metric rises. Lower = safer against trading one skill for another, more refusals."
    )


class SelfImproveConfig(StageConfig):
    """N OSPO rounds back to back, each starting from the latest promoted model (the nightly deployment)."""

    rounds: int = Field(1, ge=1, le=100, description="Rounds to run now. Each round trains on data its own start "
                        "model generated.")
    round_prefix: str = Field("nightly", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,60}$",
                              description="Round ids are <prefix>-<date>-<time>-<n>.")
    round: RoundConfig = Field(default_factory=RoundConfig, description="Settings of every round; its model and "
                               "adapters are where the lineage starts when nothing has been promoted yet.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation of each round: its start "
                             "model and its trained model on the same prompts, seeds and questions.")
    gate: GateConfig = Field(default_factory=GateConfig, description="When a round is promoted; a round that is not "
                             "is kept (folder, adapter, registry entry). The gate decides on eval.judge (default "
                             "fixed: the start model judges both models' images); the trained model's self-judged "
                             "numbers are shown beside it and their difference reported as judge drift.")
    lineage: Literal["latest", "promoted"] = Field(
        "latest",
        description="Where round n+1 starts. latest (the paper): from round n's trained model, promoted or not; the "
        "gate's decision marks which model to deploy. promoted: from the last promoted model, so a refused round is "
        "a dead end and the next round retries from the last good model.",
    )
    keep_last: int | None = Field(
        10, ge=0, le=100_000, description="Retention, applied after each round's promotion decision: keep the folders "
        "of the newest this many registered rounds (every round in a promoted lineage, and any round still running, "
        "is always kept; registry entries stay). None = keep everything. Lower = less disk, fewer rounds to inspect.")


class PretrainConfig(StageConfig):
    """The testbed's start model: plain supervised next-token training on (caption -> scene grid) pairs."""

    steps: int = Field(2000, ge=1, le=100_000, description="Optimizer steps on clean captions: the skills. More = "
                       "a better start model; fewer = a weaker one that the rounds' own samples cannot lift much.")
    noisy_steps: int = Field(300, ge=0, le=100_000, description="Steps after the clean ones, at half the peak rate, "
                             "on captions of which caption_noise are wrong: the confusions rounds should remove.")
    caption_noise: float = Field(
        0.4, ge=0, lt=1, description="Fraction of the noisy phase's scenes that depict a perturbed caption (a "
        "replaced colour, shape, count or relation, swapped attributes, a dropped object), like the noisy alt-text of "
        "web data. Higher = a lower start and more for the rounds to fix; 0 (or noisy_steps 0) = a clean start, "
        "limited by its capacity, which self-generated data barely moves (see TESTBED.md)."
    )
    batch_size: int = Field(64, ge=1, le=4096, description="Captions per step (categories drawn uniformly), each "
                            "with a fresh random scene.")
    learning_rate: float = Field(2e-3, gt=0, le=1, description="AdamW peak learning rate, cosine-decayed to a tenth "
                                 "over the clean steps. Higher = leaves the early plateau sooner, until it diverges.")
    unconditional_prob: float = Field(0.1, ge=0, lt=1, description="Fraction of rows whose caption is blanked (the "
                                      "sampler's unconditional twin), so classifier-free guidance has an "
                                      "unconditional model to push away from; Janus trains with 10%.")
    seed: Seed = Field(0, description="Seed of the initial weights, the captions and the scenes.")
    hidden_size: int = Field(128, ge=16, le=4096, description="Width of the language model. Wider and deeper = "
                             "learns to count and relate objects in fewer steps, but every step, round and sample "
                             "costs more.")
    num_layers: int = Field(4, ge=1, le=64, description="Layers of the language model (see hidden_size).")
    judge_steps: int = Field(2400, ge=0, le=100_000, description="Steps of the judge phase after the drawing "
                             "phases: yes/no questions about scenes, oracle-labelled, so the model can judge its own "
                             "images (VQAConfig.judge = self_grid): ~90% agreement with the oracle after 2,400 at "
                             "batch 128 (TESTBED.md). 0 = a model that only draws (its answers are noise).")
    judge_batch_size: int = Field(128, ge=1, le=4096, description="Questions per judge step, half answered yes. "
                                  "Larger batches judge better for the same steps (2,400 steps, agreement on the "
                                  "build's 512 questions: 0.81 at 32, 0.83 at 64, 0.92 at 128) and cost "
                                  "proportionally more time.")
    judge_learning_rate: float = Field(2e-3, gt=0, le=1, description="AdamW peak rate of the judge phase, "
                                       "cosine-decayed to a tenth.")
    judge_draw_weight: float = Field(1.0, ge=0, le=100, description="Weight of the noisy phase's drawing loss kept "
                                     "during the judge phase: the language model is shared, and learning to answer "
                                     "alone unlearns drawing (0 took held-out accuracy from 0.25 to 0.00 in 1,200 "
                                     "steps). 0 = answer loss only.")
    judge_draw_batch_size: int = Field(16, ge=1, le=4096, description="Captions per judge step for that drawing "
                                       "loss.")


# The ablation's training settings, each a TrainConfig override of the testbed round (same steps, data and seeds).
TESTBED_SETTINGS: dict[str, dict] = {
    "sft": {"simpo_weight": 0.0, "copo_weight": 0.0},  # 1. SFT on the chosen images only
    "simpo": {"copo_weight": 0.0, "sft_weight": 0.0},  # 2. SimPO only
    "simpo+sft": {"copo_weight": 0.0},  # 3. SimPO + SFT
    "ospo": {},  # 4. SimPO + conditional preference + SFT: the v2 default
    "ospo+objw": {"object_weighting": True},  # 5. v2 with object weighting (attention masks stage)
    "dpo": {"loss": "dpo"},  # 6. v2 with the pair term as DPO against the round's start model
}


class TestbedConfig(StageConfig):
    """`ospo testbed`: the ablation table on the shapes world. Every setting starts from the same pre-trained
    checkpoint, sees the same round-1 data and trains the same number of steps; rounds chain per setting."""

    rounds: int = Field(4, ge=1, le=20, description="Rounds per setting; round n+1 draws its data with the model "
                        "of round n. More rounds = more self-improvement, proportionally more time.")
    seeds: list[Seed] = Field([0, 1, 2], min_length=1, description="Repeats of the whole table; each seed changes the "
                             "rounds' prompts, images, training order and evaluation noise (not the checkpoint).")
    settings: list[str] = Field(["sft", "ospo", "ospo+objw", "dpo"], min_length=1, description="Which training "
                                f"settings to compare, from {list(TESTBED_SETTINGS)}.")
    judges: list[Literal["oracle", "self_grid"]] = Field(
        ["oracle", "self_grid"], min_length=1, description="Who answers the rounds' questions, each a column of the "
        "table: oracle (exact) or self_grid (the model judging its own drawings, ospo_core.testbed.judge). Replaces "
        "round.vqa.judge.")
    self_judge: Literal["start", "round"] = Field(
        "start", description="Which of the model's selves judges in self_grid rounds: start = the checkpoint the "
        "rounds started from, every round (the model's own understanding before self-improvement, which the rounds' "
        "drawing updates cannot erode); round = the model that starts each round, whose answers drift as its "
        "drawing trains (TESTBED.md).")
    eval_samples: int = Field(256, ge=1, le=10_000, description="Scenes drawn per category at each evaluation, over "
                              "the held-out captions. More = a steadier metric: the overall exact rate's standard "
                              "error is ~0.012 at 256 (the start model measured 0.234-0.281 over three seeds at 64) "
                              "for ~3 s per evaluation on a core.")
    workers: int = Field(2, ge=1, le=64, description="Seeds run side by side in this many processes (one per core "
                         "of a 2-core machine by default); the results do not depend on it.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="The start model.")
    round: RoundConfig = Field(default_factory=dict, validate_default=True,  # {} -> the testbed preset, below
                               description="Settings of every round (the 'testbed' preset); its model is replaced "
                               "by the pre-trained checkpoint and its train section by each setting's override.")

    @field_validator("round", mode="before")
    @classmethod
    def _on_the_testbed_preset(cls, value):
        # A partial round (a UI form, a YAML file) changes the testbed preset, not the paper's RoundConfig defaults.
        return deep_update(TESTBED_OVERRIDES, value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _one_way_to_name_the_self_judge(self):
        if "self_grid" in self.judges and self.round.vqa.judge_model is not None:
            raise ValueError("round.vqa.judge_model is set by self_judge in self-judged testbed rounds (start: the "
                             "start checkpoint, round: each round's model); leave it unset")
        return self

    @field_validator("settings")
    @classmethod
    def _known_settings(cls, value: list[str]) -> list[str]:
        unknown = [s for s in value if s not in TESTBED_SETTINGS]
        if unknown:
            raise ValueError(f"unknown testbed setting(s) {unknown}; choose from {list(TESTBED_SETTINGS)}")
        return value


# Evaluation settings for the tiny model: one image per prompt, short question budgets and the structured question
# fallback (its text is nonsense, so its own questions never parse).
EVAL_DEMO_OVERRIDES: dict = {
    "images_per_prompt": 1,
    "questions": {"max_new_tokens": 24, "fallback": "structured"},
}
EVAL_PRESETS: dict[str, dict] = {"paper": {}, "demo": EVAL_DEMO_OVERRIDES}


class ExecutionConfig(StageConfig):
    """Where a round's model work runs: in this process or sharded over a Ray cluster, and how many processes train.

    Execution never changes a table: rows are seeded per item and a shard holds the same rows whichever worker
    computes it, so a round started in one mode resumes in the other. Training is the exception that the cache key
    records: more processes mean a larger global batch (batch_size x gradient_accumulation_steps x num_processes).
    """

    execution: Literal["local", "ray"] = Field(
        "local",
        description="local: every stage runs in the flow's process, one model in memory. ray: the rendering, self-VQA "
        "and text stages (negatives, dense, questions) are split into shards that model replicas on a Ray cluster "
        "compute in parallel (needs `pip install .[ray]`); the other stages stay in the flow's process.",
    )
    address: str | None = Field(
        None,
        description="Ray cluster to join ('auto', 'HOST:6379', or 'ray://HOST:10001' from outside the cluster); "
        "None = start a single-machine cluster inside the flow's process (for one machine, and for tests).",
    )
    workers_per_node: int = Field(
        1, ge=1, le=256, description="Model replicas on each node that can hold one (one per GPU is usual). More = "
        "more shards at once, each holding a full copy of the model in (GPU) memory."
    )
    gpus_per_worker: float | None = Field(
        None, ge=0, le=16, description="GPUs reserved by each replica; None = 1 where the cluster has GPUs, else 0 "
        "(CPU workers, one core each). A fraction (0.5) packs two replicas on one GPU if the model fits twice."
    )
    num_processes: int = Field(
        1, ge=1, le=1024, description="Data-parallel training processes (one per GPU; on CPU, gloo processes). 1 = "
        "train in the flow's process; more = `accelerate launch`, and the global batch grows with them."
    )
    data_parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With num_processes > 1: ddp keeps a full model per GPU (fastest; LoRA on 1B and 7B fits "
        "a large card). fsdp (FSDP2) shards the frozen base model across the processes too: for 7B on cards too "
        "small for a full copy each, at the cost of gathering the weights every step."
    )
