"""Few-shot templates of the text stages and the method's fixed tables.

The wording lives in the JSON files beside this module (written for this project, following the structure, markers
and shot counts of the spec): `prompts.json` (stage 1, one template per sub-category), `negatives.json` (2a),
`dense.json` (2b), `questions.json` (3a) and `vocabulary.json` (the structured fallback's built-in words). The
functions here turn them into chats through the one chat template, `few_shot_chat`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from ospo_core.janus.chat import few_shot_chat
from ospo_core.templates.parse import PromptAnswer

# Spec 1: the twelve runs -> (t2i_category, sub_category), in the fixed order that numbers item ids.
SUB_CATEGORIES: dict[str, tuple[str, str]] = {
    "color1": ("attribute", "attribute1_color"),
    "color2": ("attribute", "attribute2"),
    "shape1": ("attribute", "attribute1_shape"),
    "shape2": ("attribute", "attribute2"),
    "texture1": ("attribute", "attribute1_texture"),
    "texture2": ("attribute", "attribute2"),
    "2D_spatial": ("layout", "layout1"),
    "3D_spatial": ("layout", "layout1"),
    "numeracy1": ("layout", "layout2"),
    "numeracy2": ("layout", "layout3"),
    "non-spatial": ("non-spatial", "non-spatial"),
    "complex": ("complex", "complex"),
}
# item_id = prefix + a 6-digit counter that runs per t2i_category over its sub-categories in the order above.
CATEGORY_PREFIX = {"attribute": 0, "layout": 1, "non-spatial": 2, "complex": 3}
# Spec 1, rule 2: the stop-substring filter does not apply to these categories' free-form sentences.
UNFILTERED_CATEGORIES = frozenset({"non-spatial", "complex"})
# Spec 1, rotation: shots redrawn from accepted prompts (the base non-spatial template has 2, rotation uses 3).
ROTATION_SHOTS = {"complex": 5}
DEFAULT_ROTATION_SHOTS = 3

# Spec 2a: the perturbation of index k = 0, 1, 2 for each sub_category (non-spatial swap is never assigned).
PERTURBATIONS: dict[str, tuple[str, str, str]] = {
    "attribute1_color": ("replace", "replace", "replace"),
    "attribute1_shape": ("replace", "replace", "replace"),
    "attribute1_texture": ("replace", "replace", "replace"),
    "attribute2": ("replace", "swap", "drop"),
    "layout1": ("replace", "swap", "drop"),
    "layout2": ("replace", "replace", "replace"),
    "layout3": ("replace", "swap", "drop"),
    "non-spatial": ("replace", "drop", "replace"),
    "complex": ("replace", "swap", "drop"),
}
# Spec 2a/2b: which negative and dense template family serves a sub_category.
FAMILIES = {
    "attribute1_color": "attribute",
    "attribute1_shape": "attribute",
    "attribute1_texture": "attribute",
    "attribute2": "attribute",
    "layout1": "spatial",
    "layout2": "numeracy",
    "layout3": "numeracy",
    "non-spatial": "non-spatial",
    "complex": "complex",
}


@cache
def _data(name: str) -> dict:
    # Read once per process; callers never mutate the returned data.
    return json.loads(files(__package__).joinpath(f"{name}.json").read_text(encoding="utf-8"))


def vocabulary() -> dict:
    """The structured fallback's built-in words (colors, shapes, textures, objects, relations, numbers)."""
    return _data("vocabulary")


def item_id(t2i_category: str, counter: int) -> str:
    """Spec 1: '0000667' = attribute prompt number 667 (7 characters)."""
    if not 0 <= counter < 10**6:
        raise ValueError(f"item counter {counter} does not fit the 6 digits of an item id; lower the quotas so "
                         f"that each t2i_category has fewer than 1,000,000 prompts")
    return f"{CATEGORY_PREFIX[t2i_category]}{counter:06d}"


def with_article(phrase: str) -> str:
    """'apple' -> 'an apple', 'red cup' -> 'a red cup' (by the first letter: good enough for built-in words)."""
    return f"{'an' if phrase[:1].lower() in ('a', 'e', 'i', 'o', 'u') else 'a'} {phrase}"


def _lookup(table: dict, key: str, what: str):
    if key not in table:
        raise ValueError(f"unknown {what} {key!r}; expected one of {sorted(table)} (the spec's categories)")
    return table[key]


def perturbations_for(sub_category: str) -> tuple[str, str, str]:
    return _lookup(PERTURBATIONS, sub_category, "sub_category")


def format_prompt_answer(answer: PromptAnswer) -> str:
    """The one-line stage-1 answer format (also used for rotated shots)."""
    return f"Prompt: {answer.prompt}; Concepts and relations: {answer.concepts}; Relation: {answer.relation}"


@dataclass(frozen=True)
class PromptTemplate:
    """The stage-1 template of one sub-category run."""

    key: str
    t2i_category: str
    sub_category: str
    system: str
    instruction: str
    shots: tuple[PromptAnswer, ...]

    @property
    def filtered(self) -> bool:
        return self.t2i_category not in UNFILTERED_CATEGORIES

    @property
    def rotation_shots(self) -> int:
        return ROTATION_SHOTS.get(self.t2i_category, DEFAULT_ROTATION_SHOTS)

    def chat(self, shots: tuple[PromptAnswer, ...] | None = None) -> list[dict]:
        """The few-shot chat with the template's own shots, or with `shots` (rotation)."""
        pairs = [(self.instruction, format_prompt_answer(s)) for s in (self.shots if shots is None else shots)]
        return few_shot_chat(self.system, pairs, self.instruction)


def prompt_template(key: str) -> PromptTemplate:
    t2i_category, sub_category = _lookup(SUB_CATEGORIES, key, "prompt sub-category")
    data = _data("prompts")
    entry = data["sub_categories"][key]
    return PromptTemplate(
        key=key,
        t2i_category=t2i_category,
        sub_category=sub_category,
        system=f"{entry['system']} {data['format_note']}",
        instruction=entry["instruction"],
        shots=tuple(PromptAnswer(s["prompt"], s["concepts"], s["relation"]) for s in entry["shots"]),
    )


def negative_chat(sub_category: str, perturbation: str, prompt: str, *, seed: int) -> list[dict]:
    """Spec 2a: the user turn is the prompt, a newline, then the instruction naming <replace>/<swap>/<drop>.

    The spatial replace template names one relation drawn (with `seed`) from the spec's list, in its instruction and
    in its replace shot, so different rows are nudged toward different relations.
    """
    family = _lookup(FAMILIES, sub_category, "sub_category")
    data = _data("negatives")
    variant = next((v for v in data["families"][family] if perturbation in v["perturbations"]), None)
    if variant is None:
        raise ValueError(f"the {family!r} negative templates have no {perturbation!r}; the spec assigns "
                         f"{perturbations_for(sub_category)} to {sub_category!r}")
    relation = random.Random(seed).choice(data["spatial_replace_relations"])

    def fill(text: str) -> str:
        return text.replace("{relation}", relation)

    def turn(text: str, method: str) -> str:
        return f"{text}\n{fill(variant['instructions'][method])}"

    shots = [(turn(s["prompt"], s["perturbation"]), fill(s["answer"])) for s in variant["shots"]]
    return few_shot_chat(variant["system"], shots, turn(prompt, perturbation))


def dense_chat(sub_category: str, prompt: str, negative_prompt: str) -> list[dict]:
    """Spec 2b: one call writes the dense versions of the base prompt (Prompt 1) and its negative (Prompt 2)."""
    family = _lookup(FAMILIES, sub_category, "sub_category")
    data = _data("dense")

    def turn(first: str, second: str) -> str:
        return f"Prompt 1: {first}\nPrompt 2: {second}\n{data['instruction']}"

    shots = [(turn(s["prompt"], s["negative_prompt"]), s["answer"]) for s in data["families"][family]]
    return few_shot_chat(data["system"], shots, turn(prompt, negative_prompt))


def question_chat(t2i_category: str, prompt: str) -> list[dict]:
    """Spec 3a: the short prompt -> `Concepts and relations: ...; Questions: ...?` (template by t2i_category)."""
    data = _data("questions")
    shots = _lookup(data["families"], t2i_category, "t2i_category")
    return few_shot_chat(data["system"], [(s["prompt"], s["answer"]) for s in shots], prompt)
