"""Stage 3c-3e: turn each item's self-VQA scores into one preference pair (chosen image, rejected image, rejected
prompt), or a reason why the item yields none.

Three rules sit behind `SelectConfig.rule`:
- v2, the paper (3c, 3d): chosen candidates are base images that pass every base question by `margin`, rejected
  candidates are negative images that fail at least one; chosen = the best local score; rejected image = the
  candidate whose likelihood l(x_b, y) is closest to the chosen one's (the hardest negative); rejected prompt = the
  negative prompt whose questions the chosen image fails, with l(x_neg_i, y_c) closest to l(x_b, y_c).
- v1 (3e): same-index pairs (base_k, negative_k) ranked by preference strength; the last question is global.
- v3 (3e): same-index pairs, chosen local score >= `min_chosen_score`, the best chosen local score wins.

The per-item rules are pure functions over scores (and, for v2, log-likelihood numbers), so they are checked
against the scores recorded in the authors' examples without a model. `select_pairs` applies a rule to the stage
tables and asks `loglik_fn` for every likelihood v2 needs in ONE call, so the model sees full batches.

Image tokens (`SelectConfig.token_source`): the likelihoods and the pairs table's chosen/rejected tokens are the
sampled ids, or the PNGs re-encoded by the VQ encoder (the paper; `encode_fn`), so the masks and training that read
the pairs table use the very tokens the selection scored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import pyarrow as pa

from ospo_core.config import SelectConfig
from ospo_core.records import IMAGES, NEGATIVES, PAIRS, QUESTIONS, VQA, check_schema, to_table

Answer = Literal["yes", "no", "tie"]
# loglik_fn(prompts, image_tokens)[j] = l(x_j, y_j): the mean log-probability of the image tokens y_j under the
# generation prompt of the SHORT text x_j (spec section 4).
LoglikFn = Callable[[list[str], list[list[int]]], list[float]]
# encode_fn(image cells) -> the VQ tokens of each stored PNG (token_source "reencode").
EncodeFn = Callable[[list[dict]], list[list[int]]]

# The reason codes an item can be rejected with, in the order they are checked.
REASONS = (
    "no_base_questions",  # the base prompt has no usable decomposed questions
    "no_global_question",  # v1 only: needs local questions plus the global one (at least 2)
    "no_scored_base_image",  # no base image has a complete set of base-question scores
    "no_scored_negative_image",  # no negative image has a complete set of base-question scores
    "no_chosen_candidate",  # no base image passes the chosen filter
    "no_rejected_candidate",  # no negative image passes the rejected filter
    "no_same_index_pair",  # v1/v3: no index k where both base_k and negative_k are candidates
    "no_nonnegative_gap",  # v1: no same-index pair with local_gap >= 0 and global_gap >= 0
    "unscored_rejected_prompts",  # v2: the chosen image was not scored on any negative prompt's questions
    "no_rejected_prompt",  # no negative prompt to pair (v2: none whose questions the chosen image fails)
)


def answer(p_yes: float, p_no: float) -> Answer:
    """The self-VQA answer: the more probable of yes/no, "tie" when equal."""
    return "yes" if p_yes > p_no else "no" if p_no > p_yes else "tie"


def local_score(p_yes: Sequence[float], p_no: Sequence[float]) -> float:
    """mean over questions of (p_yes - p_no), in [-1, 1]."""
    if len(p_yes) != len(p_no) or not p_yes:
        raise ValueError(f"local_score needs equal, non-zero numbers of p_yes and p_no, got {len(p_yes)}/{len(p_no)}")
    return sum(y - n for y, n in zip(p_yes, p_no)) / len(p_yes)


@dataclass(frozen=True)
class ImageScore:
    """One image's yes/no probabilities for one question list, in question order.

    `k` is the image's index; for the chosen image scored on a negative prompt's questions (v2, 3d) it is the
    index i of that negative prompt.
    """

    k: int
    p_yes: tuple[float, ...]
    p_no: tuple[float, ...]

    def __post_init__(self):
        if len(self.p_yes) != len(self.p_no) or not self.p_yes:
            raise ValueError(f"image {self.k}: need equal, non-zero numbers of p_yes and p_no")

    @property
    def local(self) -> float:
        return local_score(self.p_yes, self.p_no)

    @property
    def answers(self) -> tuple[Answer, ...]:
        return tuple(answer(y, n) for y, n in zip(self.p_yes, self.p_no))

    def split_global(self) -> tuple[ImageScore, float]:
        """v1: (scores on the local questions, p_yes - p_no of the global question, which is the last)."""
        if len(self.p_yes) < 2:
            raise ValueError(f"image {self.k}: v1 needs at least one local question plus the global question")
        return ImageScore(self.k, self.p_yes[:-1], self.p_no[:-1]), self.p_yes[-1] - self.p_no[-1]


@dataclass(frozen=True)
class Selection:
    """The pair chosen for an item and the scores that chose it (None where the rule does not use one)."""

    chosen_k: int
    rejected_k: int
    rejected_prompt_k: int  # index of the negative prompt x_r paired for conditional preference
    chosen_score: float  # local score of the chosen image
    rejected_score: float  # local score of the rejected image
    image_logp_gap: float | None = None  # v2: |l(x_b, y_c) - l(x_b, y_r)|
    prompt_logp_gap: float | None = None  # v2: |l(x_b, y_c) - l(x_r, y_c)|
    local_gap: float | None = None  # v1
    global_gap: float | None = None  # v1
    preference_strength: float | None = None  # v1


@dataclass(frozen=True)
class Rejection:
    reason: str  # one of REASONS


# ---------------------------------------------------------------- v2 (3c, 3d)


def is_true_positive(s: ImageScore, margin: float) -> bool:
    """3c chosen filter: p_yes - p_no > margin on every question (for margin >= 0 this implies the paper's "no
    question answered no"; a negative margin loosens the filter, -1 turns it off)."""
    return all(y - n > margin for y, n in zip(s.p_yes, s.p_no))


def is_true_negative(s: ImageScore, margin: float) -> bool:
    """3c rejected filter (also 3d, for a negative prompt): p_no - p_yes > margin on at least one question."""
    return any(n - y > margin for y, n in zip(s.p_yes, s.p_no))


@dataclass(frozen=True)
class V2Candidates:
    """An item that passed the v2 filters; the hardest negatives are picked once the likelihoods are known."""

    chosen: ImageScore  # the true positive with the best local score
    rejected: tuple[ImageScore, ...]  # negative images that are true negatives on the base questions
    rejected_prompts: tuple[ImageScore, ...]  # the chosen image on each negative prompt's questions (k = i), failing


def v2_candidates(
    base: Sequence[ImageScore],
    negative: Sequence[ImageScore],
    under_negative: Mapping[int, Sequence[ImageScore]],
    *,
    margin: float,
) -> V2Candidates | Rejection:
    """The v2 filters of 3c and 3d.

    base / negative: the base and negative images on the base questions. under_negative[k]: base image k on the
    questions of each negative prompt i (ImageScore.k = i). Ties in local score go to the first image.
    """
    chosen_pool = [s for s in base if is_true_positive(s, margin)]
    if not chosen_pool:
        return Rejection("no_chosen_candidate")
    rejected = tuple(s for s in negative if is_true_negative(s, margin))
    if not rejected:
        return Rejection("no_rejected_candidate")
    chosen = max(chosen_pool, key=lambda s: s.local)
    scored = under_negative.get(chosen.k, ())
    if not scored:
        return Rejection("unscored_rejected_prompts")
    prompts = tuple(s for s in scored if is_true_negative(s, margin))
    if not prompts:
        return Rejection("no_rejected_prompt")
    return V2Candidates(chosen, rejected, prompts)


def hardest_negative(anchor: float, candidates: Sequence[float]) -> tuple[int, float]:
    """(j, gap): the candidate likelihood closest to `anchor`, argmin_j |anchor - l_j| (first on ties)."""
    gaps = [abs(anchor - c) for c in candidates]
    j = min(range(len(gaps)), key=gaps.__getitem__)
    return j, gaps[j]


def v2_choose(
    c: V2Candidates, *, logp_chosen: float, logp_rejected: Sequence[float], logp_swapped: Sequence[float]
) -> Selection:
    """3c/3d final choice from the likelihoods of the current model.

    logp_chosen = l(x_b, y_c); logp_rejected[j] = l(x_b, y_j) for c.rejected[j];
    logp_swapped[j] = l(x_neg_i, y_c) for i = c.rejected_prompts[j].k.
    """
    if len(logp_rejected) != len(c.rejected) or len(logp_swapped) != len(c.rejected_prompts):
        raise ValueError("v2_choose needs one likelihood per rejected candidate and per rejected prompt")
    j, image_gap = hardest_negative(logp_chosen, logp_rejected)
    i, prompt_gap = hardest_negative(logp_chosen, logp_swapped)
    return Selection(
        chosen_k=c.chosen.k,
        rejected_k=c.rejected[j].k,
        rejected_prompt_k=c.rejected_prompts[i].k,
        chosen_score=c.chosen.local,
        rejected_score=c.rejected[j].local,
        image_logp_gap=image_gap,
        prompt_logp_gap=prompt_gap,
    )


# ---------------------------------------------------------------- v1 and v3 (3e)


def select_v1(base: Sequence[ImageScore], negative: Sequence[ImageScore]) -> Selection | Rejection:
    """V1 preference strength over same-index pairs; every score list ends with the global question.

    Keep pairs with local_gap >= 0 and global_gap >= 0, normalise each gap by its max over the kept pairs, and
    take the argmax (first on ties) of PS = (|lg| / (max_lg + 1e-8)) / (|gg| / (max_gg + 1e-8) + 1e-8).
    """
    negatives = {s.k: s for s in negative}
    same_index = [(b, negatives[b.k]) for b in base if b.k in negatives]
    if not same_index:
        return Rejection("no_same_index_pair")
    kept = []
    for b, n in same_index:
        (b_local, b_global), (n_local, n_global) = b.split_global(), n.split_global()
        lg, gg = b_local.local - n_local.local, b_global - n_global
        if lg >= 0 and gg >= 0:
            kept.append((b.k, lg, gg, b_local.local, n_local.local))
    if not kept:
        return Rejection("no_nonnegative_gap")
    max_lg = max(abs(p[1]) for p in kept)
    max_gg = max(abs(p[2]) for p in kept)
    strengths = [(abs(lg) / (max_lg + 1e-8)) / (abs(gg) / (max_gg + 1e-8) + 1e-8) for _, lg, gg, _, _ in kept]
    best = max(range(len(kept)), key=strengths.__getitem__)
    k, lg, gg, chosen_score, rejected_score = kept[best]
    return Selection(
        chosen_k=k,
        rejected_k=k,
        rejected_prompt_k=k,
        chosen_score=chosen_score,
        rejected_score=rejected_score,
        local_gap=lg,
        global_gap=gg,
        preference_strength=strengths[best],
    )


def select_v3(
    base: Sequence[ImageScore], negative: Sequence[ImageScore], *, min_chosen_score: float
) -> Selection | Rejection:
    """V3: a chosen candidate has at least one "yes" and local score >= min_chosen_score; a rejected candidate has
    at least one answer that is not "yes" (a tie is not a yes); pairs share their index; the best chosen local
    score wins (first on ties)."""
    chosen = [s for s in base if "yes" in s.answers and s.local >= min_chosen_score]
    if not chosen:
        return Rejection("no_chosen_candidate")
    rejected = {s.k: s for s in negative if any(a != "yes" for a in s.answers)}
    if not rejected:
        return Rejection("no_rejected_candidate")
    pairs = [s for s in chosen if s.k in rejected]
    if not pairs:
        return Rejection("no_same_index_pair")
    best = max(pairs, key=lambda s: s.local)
    return Selection(
        chosen_k=best.k,
        rejected_k=best.k,
        rejected_prompt_k=best.k,
        chosen_score=best.local,
        rejected_score=rejected[best.k].local,
    )


# ---------------------------------------------------------------- the stage tables


# The columns select_pairs reads from each input (names and types from records.py).
_READS = {
    "images": (IMAGES, ["item_id", "t2i_category", "sub_category", "side", "k", "image", "image_tokens", "ok"]),
    "vqa": (VQA, ["item_id", "side", "k", "question_set", "q_index", "p_yes", "p_no", "ok"]),
    "questions": (QUESTIONS, ["item_id", "t2i_category", "sub_category", "side", "k", "prompt", "questions", "ok"]),
    "negatives": (NEGATIVES, ["item_id", "t2i_category", "sub_category", "k", "negative_prompt", "ok"]),
}


@dataclass
class _Item:
    """What the four input tables say about one item (ok rows only)."""

    item_id: str
    t2i_category: str | None = None
    sub_category: str | None = None
    prompt: str | None = None  # x_b, from the base questions row
    n_questions: dict[str, int] = field(default_factory=dict)  # question_set -> number of questions
    negative_prompts: dict[int, str] = field(default_factory=dict)  # k -> x_neg_k
    image_rows: dict[tuple[str, int], int] = field(default_factory=dict)  # (side, k) -> row in `images`
    answers: dict[tuple[str, int, str], dict[int, tuple[float, float]]] = field(default_factory=dict)

    def scores(self, side: str, k: int, question_set: str) -> ImageScore | None:
        """The image's scores on a question set, or None unless every question of the set was scored."""
        got = self.answers.get((side, k, question_set), {})
        n = self.n_questions.get(question_set, 0)
        if n == 0 or sorted(got) != list(range(n)):
            return None
        return ImageScore(k, tuple(got[q][0] for q in range(n)), tuple(got[q][1] for q in range(n)))

    def scored_images(self, side: str) -> list[ImageScore]:
        found = (self.scores(s, k, "base") for s, k in sorted(self.image_rows) if s == side)
        return [s for s in found if s is not None]


def _question_set(side: str, k: int) -> str:
    return "base" if side == "base" else f"negative_{k}"


def _gather(images: pa.Table, vqa: pa.Table, questions: pa.Table, negatives: pa.Table) -> dict[str, _Item]:
    items: dict[str, _Item] = {}

    def item(row: dict) -> _Item:
        it = items.setdefault(row["item_id"], _Item(row["item_id"]))
        it.t2i_category = it.t2i_category or row.get("t2i_category")
        it.sub_category = it.sub_category or row.get("sub_category")
        return it

    def once(store: dict, key, value, what: str, item_id: str) -> None:
        if key in store:
            raise ValueError(f"item {item_id}: {what} {key} appears twice among the ok rows; were shards concatenated "
                             f"twice? Rewrite the input table")
        store[key] = value

    # Only the keys here: image bytes and tokens are fetched later for the selected rows alone.
    keys = ["item_id", "t2i_category", "sub_category", "side", "k", "ok"]
    for row_index, row in enumerate(images.select(keys).to_pylist()):
        it = item(row)
        if row["ok"]:
            once(it.image_rows, (row["side"], row["k"]), row_index, "image (side, k)", it.item_id)
    for row in questions.select(_READS["questions"][1]).to_pylist():
        it = item(row)
        if not row["ok"]:
            continue
        qset = _question_set(row["side"], row["k"])
        once(it.n_questions, qset, len(row["questions"] or []), "question set", it.item_id)
        if qset == "base":
            it.prompt = row["prompt"]
    for row in negatives.select(_READS["negatives"][1]).to_pylist():
        it = item(row)
        if row["ok"]:
            once(it.negative_prompts, row["k"], row["negative_prompt"], "negative prompt k", it.item_id)
    for row in vqa.select(_READS["vqa"][1]).to_pylist():
        it = item(row)
        if row["ok"]:
            got = it.answers.setdefault((row["side"], row["k"], row["question_set"]), {})
            once(got, row["q_index"], (row["p_yes"], row["p_no"]), "VQA answer to question", it.item_id)
    return items


def _first_pass(it: _Item, cfg: SelectConfig) -> Selection | Rejection | V2Candidates:
    """Everything that needs no model; v2 stops at its candidates."""
    n = it.n_questions.get("base", 0)
    if n == 0:
        return Rejection("no_base_questions")
    if cfg.rule == "v1" and n < 2:
        return Rejection("no_global_question")
    base, negative = it.scored_images("base"), it.scored_images("negative")
    if not base:
        return Rejection("no_scored_base_image")
    if not negative:
        return Rejection("no_scored_negative_image")
    if cfg.rule == "v2":
        # under_negative[k]: base image k on each negative prompt i's questions, labelled with i (3d).
        under_negative = {}
        for b in base:
            found = ((i, it.scores("base", b.k, _question_set("negative", i))) for i in sorted(it.negative_prompts))
            under_negative[b.k] = [replace(s, k=i) for i, s in found if s is not None]
        return v2_candidates(base, negative, under_negative, margin=cfg.margin)
    if cfg.rule == "v1":
        chosen = select_v1(base, negative)
    else:
        chosen = select_v3(base, negative, min_chosen_score=cfg.min_chosen_score)
    if isinstance(chosen, Selection) and chosen.rejected_prompt_k not in it.negative_prompts:
        return Rejection("no_rejected_prompt")
    return chosen


def select_pairs(
    images: pa.Table,
    vqa: pa.Table,
    questions: pa.Table,
    negatives: pa.Table,
    cfg: SelectConfig,
    loglik_fn: LoglikFn | None = None,
    encode_fn: EncodeFn | None = None,
) -> pa.Table:
    """One PAIRS row per item (sorted by item_id): the selected pair with its scores, or ok=False with a reason.

    Reads the ok rows of: images (IMAGES), vqa (VQA; question_set "base" for every image on the base questions,
    "negative_{i}" for base images on negative prompt i's questions, which v2 needs for the chosen image),
    questions (QUESTIONS; the base row's prompt is x_b), negatives (NEGATIVES; x_neg_k). `loglik_fn` is required
    for rule v2 and called once with every (prompt, image tokens) the rule needs. With `encode_fn` every token list
    (likelihoods and the pairs table) is the stored PNG re-encoded; without, the sampled ids.
    """
    for name, table in (("images", images), ("vqa", vqa), ("questions", questions), ("negatives", negatives)):
        expected, columns = _READS[name]
        check_schema(table.schema, expected, table=name, columns=columns)
    if cfg.rule == "v2" and loglik_fn is None:
        raise ValueError("rule v2 picks the hardest negatives by image log-likelihood: pass loglik_fn")
    tokens_of = _token_reader(images, encode_fn)

    items = _gather(images, vqa, questions, negatives)
    decided = {item_id: _first_pass(it, cfg) for item_id, it in sorted(items.items())}
    if cfg.rule == "v2":
        decided.update(_v2_second_pass(items, decided, tokens_of, loglik_fn))

    selected = [(items[i], d) for i, d in decided.items() if isinstance(d, Selection)]
    picks = [it.image_rows[("base", d.chosen_k)] for it, d in selected]
    picks += [it.image_rows[("negative", d.rejected_k)] for it, d in selected]
    fetched = images.select(["image"]).take(pa.array(picks, type=pa.int64())).to_pylist()
    for row, tokens in zip(fetched, tokens_of(picks)):
        row["image_tokens"] = tokens
    chosen_rows, rejected_rows = iter(fetched[: len(selected)]), iter(fetched[len(selected) :])

    rows = []
    for item_id, d in decided.items():
        it = items[item_id]
        row = {"item_id": item_id, "t2i_category": it.t2i_category, "sub_category": it.sub_category,
               "rule": cfg.rule, "prompt": it.prompt, "ok": isinstance(d, Selection)}
        if isinstance(d, Rejection):
            row["reason"] = d.reason
        else:
            c, r = next(chosen_rows), next(rejected_rows)
            row |= {
                "rejected_prompt": it.negative_prompts[d.rejected_prompt_k],
                "chosen_k": d.chosen_k, "chosen_side": "base", "rejected_k": d.rejected_k,
                "rejected_side": "negative", "rejected_prompt_k": d.rejected_prompt_k,
                "chosen": c["image"], "rejected": r["image"],
                "chosen_tokens": c["image_tokens"], "rejected_tokens": r["image_tokens"],
                "chosen_score": d.chosen_score, "rejected_score": d.rejected_score,
                "image_logp_gap": d.image_logp_gap, "prompt_logp_gap": d.prompt_logp_gap,
                "local_gap": d.local_gap, "global_gap": d.global_gap, "preference_strength": d.preference_strength,
            }
        rows.append(row)
    return to_table(rows, PAIRS)


def _token_reader(images: pa.Table, encode_fn: EncodeFn | None) -> Callable[[list[int]], list[list[int]]]:
    """rows of `images` -> their tokens (sampled, or re-encoded once per row and remembered)."""
    encoded: dict[int, list[int]] = {}

    def tokens(rows: list[int]) -> list[list[int]]:
        if encode_fn is None:
            return images.column("image_tokens").take(pa.array(rows, type=pa.int64())).to_pylist()
        todo = sorted(set(rows) - set(encoded))
        if todo:
            cells = images.column("image").take(pa.array(todo, type=pa.int64())).to_pylist()
            encoded.update(zip(todo, encode_fn(cells)))
        return [encoded[r] for r in rows]

    return tokens


def _v2_second_pass(
    items: dict[str, _Item], decided: dict, tokens_of: Callable[[list[int]], list[list[int]]], loglik_fn: LoglikFn
) -> dict[str, Selection]:
    """Ask the model for every likelihood the v2 candidates need in one call, then pick the hardest negatives.

    Per item the requests are: (x_b, y_c), then (x_b, y_r) per rejected candidate, then (x_neg_i, y_c) per
    rejected prompt candidate.
    """
    plans = {i: c for i, c in decided.items() if isinstance(c, V2Candidates)}
    prompts, rows = [], []
    for item_id, c in plans.items():
        it = items[item_id]
        chosen_row = it.image_rows[("base", c.chosen.k)]
        prompts += [it.prompt] * (1 + len(c.rejected)) + [it.negative_prompts[s.k] for s in c.rejected_prompts]
        rows += [chosen_row] + [it.image_rows[("negative", s.k)] for s in c.rejected] + [chosen_row] * len(
            c.rejected_prompts
        )
    if not prompts:
        return {}
    logps = list(loglik_fn(prompts, tokens_of(rows)))
    if len(logps) != len(prompts):
        raise ValueError(f"loglik_fn returned {len(logps)} values for {len(prompts)} (prompt, image) pairs")
    out, at = {}, 0
    for item_id, c in plans.items():
        n_r, n_p = len(c.rejected), len(c.rejected_prompts)
        chunk = logps[at : at + 1 + n_r + n_p]
        at += 1 + n_r + n_p
        out[item_id] = v2_choose(c, logp_chosen=chunk[0], logp_rejected=chunk[1 : 1 + n_r],
                                 logp_swapped=chunk[1 + n_r :])
    return out


def select(images: pa.Table, vqa: pa.Table, questions: pa.Table, negatives: pa.Table, tools,
           cfg: SelectConfig) -> pa.Table:
    """`select_pairs` as a round runs it: rule v2 asks the round's model for the image log-likelihoods, and with
    token_source "reencode" its VQ encoder re-encodes the PNGs."""
    return select_pairs(images, vqa, questions, negatives, cfg, model_loglik(tools.model) if cfg.rule == "v2" else None,
                        model_encoder(tools.model) if cfg.token_source == "reencode" else None)


def model_encoder(bundle, *, batch_size: int = 16) -> EncodeFn:
    """The production encode_fn: each stored PNG through the bundle's VQ encoder (spec section 4), in batches."""
    from ospo_core.janus.score import encode_images
    from ospo_core.records import decode_image

    def encode(cells: list[dict]) -> list[list[int]]:
        out = []
        for start in range(0, len(cells), batch_size):
            images = [decode_image(c) for c in cells[start : start + batch_size]]
            if any(image is None for image in images):
                raise ValueError("a selected image's PNG does not decode; the images table is damaged: re-render it")
            out += encode_images(bundle, images).tolist()
        return out

    return encode


def model_loglik(bundle, *, batch_size: int = 8) -> LoglikFn:
    """The production loglik_fn: l(x, y) = the mean image-token log-probability under the bundle's generation head."""
    import torch  # the model layer is loaded only by the caller that has a model

    from ospo_core.janus.score import image_logprobs

    def loglik(prompts: list[str], image_tokens: list[list[int]]) -> list[float]:
        _, mean = image_logprobs(bundle, prompts, torch.tensor(image_tokens, dtype=torch.long), batch_size=batch_size)
        return mean.tolist()

    return loglik
