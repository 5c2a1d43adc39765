"""The fixed judge: a frozen Janus that answers exactly as the self judge does (yes/no probabilities from the
understanding chat), but whose weights do not change while a round trains.

Why: the LoRA trains the language model that also answers the questions, so a round that only taught the model to
say "yes" would look better to itself. The promotion gate therefore lets the round's start model judge both the
start model's and the trained model's images; the self-judged numbers are shown beside it (judge drift).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ospo_core.janus import score as janus_score
from ospo_core.judges.folders import folder_identity

Scores = list[tuple[float, float] | None]
# (model, adapters, fingerprint): a Janus as the round records it; fingerprint "" when not known yet
JanusSource = tuple[str, tuple[str, ...], str]

_LOADED: dict[tuple, Any] = {}  # one judge model per process, besides the stage's own


def frozen_model(model: str, adapters=()):
    """A judge's own model (a folder or "tiny", plus adapters), loaded once per process: every stage call and round
    builds its judge anew, and the judge's weights do not change during a run."""
    key = (model, tuple(adapters))
    if key not in _LOADED:
        from ospo_core.janus.load import load_janus

        _LOADED.clear()
        _LOADED[key] = load_janus(model, adapters=tuple(adapters))
    return _LOADED[key]


def janus_answers(bundle, rows: list[dict], questions: list[list[str]], batch_size: int) -> list[Scores | None]:
    """(p_yes, p_no) per question from the decoded PNG of each row; None for a row whose PNG does not decode."""
    from ospo_core.records import decode_image

    decoded = {}  # an image asked several question sets is decoded once
    images = [decoded[id(row)] if id(row) in decoded else decoded.setdefault(id(row), decode_image(row["image"]))
              for row in rows]
    readable = [i for i, image in enumerate(images) if image is not None]
    scores = janus_score.score_yes_no(bundle, [images[i] for i in readable], [questions[i] for i in readable],
                                      batch_size=batch_size)
    out: list[Scores | None] = [None] * len(rows)
    for i, s in zip(readable, scores):
        out[i] = s
    return out


class FixedJudge:
    """A frozen Janus. `source` is the round's start model (model, adapters, fingerprint) or a folder / "tiny";
    `same` says it is the model the stage already holds (`model()`), which is then used instead of a second copy."""

    name = "fixed"
    code = (janus_score,)
    columns = ()
    unknown_reason = "unreadable_question"  # never used: a Janus answers any question

    def __init__(self, model: Callable[[], Any], source: JanusSource | str | None = None, same: bool = False):
        if source is None:
            raise ValueError("the fixed judge needs a model: a round's start model, or judge_model (a Janus "
                             "checkpoint folder or 'tiny')")
        self.stage_model = model
        self.source: JanusSource = (source, (), "") if isinstance(source, str) else tuple(source)
        self.same = same

    @property
    def identity(self) -> str:
        """What the judge's answers depend on, for cache keys: the start model's fingerprint, else its folder."""
        model, adapters, fingerprint = self.source
        if self.same:
            return ""  # the stage's own model, whose fingerprint every cache key holds already
        if fingerprint:
            return fingerprint
        return "tiny" if model == "tiny" else f"{model}:{folder_identity(model)}:{','.join(adapters)}"

    def model(self):
        if self.same:
            return self.stage_model()
        model, adapters, fingerprint = self.source
        bundle = frozen_model(model, adapters)
        if fingerprint and bundle.fingerprint != fingerprint:
            raise RuntimeError(f"fixed judge {model} + {len(adapters)} adapters has fingerprint {bundle.fingerprint}, "
                               f"not the recorded {fingerprint}: its weights changed; re-run the round")
        return bundle

    def answer(self, rows, questions, batch_size) -> list[Scores | None]:
        return janus_answers(self.model(), rows, questions, batch_size)
