"""The oracle judge: reads a token grid and answers yes/no questions about it exactly.

It stands in for the model's self-VQA (`VQAConfig.judge = "oracle"`): the same questions, the same (p_yes, p_no)
output, but the answers are true, as 1/0 probabilities. It reads the image tokens, never the PNG, so what it judges
is exactly what the model drew. It understands the questions the world writes (`World.questions`) and OSPO's
existence question, case and spacing aside:

- "Is there one red square?", "Are there three red squares?"     -> exactly that many objects of that kind
- "Is there a red square?"                                        -> at least one
- "Is the red square left of the blue circle?" (or "Are the ...") -> both present, every pair in that relation
- "Is there one shape in total?", "Are there four shapes in total?" -> exactly that many objects in the scene

Any other question gets None: the self-VQA stage keeps its row with ok=False (reason "oracle_unknown_question").
"""

from __future__ import annotations

import re
from functools import cache

from ospo_core.templates.parse import NUMBER_WORDS
from ospo_core.testbed.world import RELATIONS, WORLD, Kind, World

YES, NO = (1.0, 0.0), (0.0, 1.0)


@cache
def _patterns(world: World) -> dict[str, re.Pattern]:
    colours, shapes = "|".join(map(re.escape, world.colours)), "|".join(map(re.escape, world.shapes))
    numbers = "|".join(NUMBER_WORDS)
    relations = "|".join(map(re.escape, RELATIONS))
    kind = rf"(?P<c{{0}}>{colours}) (?P<s{{0}}>{shapes})s?"
    return {
        "count": re.compile(rf"(?:is|are) there (?P<n>{numbers}) {kind.format(1)}"),
        "exists": re.compile(rf"is there an? {kind.format(1)}"),
        "relation": re.compile(rf"(?:is|are) the {kind.format(1)} (?P<r>{relations}) the {kind.format(2)}"),
        "total": re.compile(rf"(?:is|are) there (?P<n>{numbers}) shapes? in total"),
    }


def answers(tokens: list[int], questions: list[str], world: World = WORLD) -> list[bool | None]:
    """True/False per question the oracle reads (see the module docstring), None for any other question."""
    objects = world.objects(tokens)  # once per grid, whatever the number of questions
    patterns = _patterns(world)

    def cells(i: int, match: re.Match) -> list[tuple[int, int]]:
        kind = Kind(match[f"c{i}"], match[f"s{i}"])
        return [where for k, where in objects if k == kind]

    def one(question: str) -> bool | None:
        text = " ".join(question.strip().rstrip("?").lower().split())
        if match := patterns["total"].fullmatch(text):
            return len(objects) == NUMBER_WORDS.index(match["n"])
        if match := patterns["count"].fullmatch(text):
            return len(cells(1, match)) == NUMBER_WORDS.index(match["n"])
        if match := patterns["exists"].fullmatch(text):
            return bool(cells(1, match))
        if match := patterns["relation"].fullmatch(text):
            return world.holds(match["r"], cells(1, match), cells(2, match))
        return None

    return [one(q) for q in questions]


def answer(tokens: list[int], question: str, world: World = WORLD) -> bool | None:
    """`answers` for one question."""
    return answers(tokens, [question], world)[0]


def oracle_scores(tokens: list[int], questions: list[str], world: World = WORLD) -> list[tuple[float, float] | None]:
    """(p_yes, p_no) per question, 1/0 from the true answer; None where the oracle cannot read the question."""
    return [None if a is None else YES if a else NO for a in answers(tokens, questions, world)]
