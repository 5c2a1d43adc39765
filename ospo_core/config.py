"""Pydantic configuration for every stage and for a whole round.

These models are validated at the edge (CLI, Prefect UI form) and are the Prefect flow parameters, so every knob has
a description that states its trade-off and a range; an invalid value is refused with the field's name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    """Base for all configs: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Fallback = Literal["none", "structured"]


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
        ge=0.0,
        lt=1.0,
        description="v2 filter margin: a chosen image needs p_yes - p_no > margin on every question, a rejected image "
        "(or rejected prompt) p_no - p_yes > margin on at least one. Higher = cleaner pairs but fewer items kept.",
    )
    min_chosen_score: float = Field(
        0.6,
        ge=-1.0,
        le=1.0,
        description="v3: a chosen image needs a local score (mean p_yes - p_no) of at least this. Higher = more "
        "faithful chosen images but fewer pairs.",
    )
