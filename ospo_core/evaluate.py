"""Held-out evaluation under a chosen judge, and the promotion gate of the self-improvement loop.

An evaluation draws `images_per_prompt` images for every prompt of a held-out set and asks a judge
(`EvalConfig.judge`, a plug-in of `ospo_core.plugins.JUDGES`) yes/no questions about each image. Per category it
reports

    mean_score = mean over images of the image's score: by default the local score mean_q (p_yes - p_no) in [-1, 1]
                 (the vqa judge: T2I-CompBench's product of p_yes, or CLIPScore for non-spatial prompts)
    all_yes    = fraction of images whose every answer is "yes" (p_yes > p_no)        in [0, 1]

and, for tagged prompts (GenEval), each tag's pass rate: the all_yes fraction of its images, which is GenEval's
"all conditions met" rule (with the geneval judge, GenEval's own detector-and-CLIP rules). The overall value of a
metric is the mean over categories, so a category weighs the same whatever its size, as in the benchmarks.

Judges: self (the evaluated model answers about its own images), fixed (a frozen Janus: a round's start model judges
both the start and the trained model's images, so training cannot teach the judge to say yes; the default), geneval
and vqa (GenEval's and T2I-CompBench's procedures on local detector / CLIP / BLIP folders). Self- and fixed-judged
numbers track a model across rounds; they are not benchmark scores. `rejudge` answers an eval table's images again
with another judge (the gate's judge drift: the trained model's own verdict beside the fixed judge's).

Questions. GenEval's metadata names the objects, counts, colours and relative positions of a prompt, and is turned
into questions deterministically (`geneval_questions`). A prompt without metadata gets its questions from the
questions stage (stage 3a), including its structured fallback for weak models.

Prompt sets: "t2i-compbench" (the 8 validation lists), "geneval" (553 prompts, by tag), or a file of prompts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, computed_field

from ospo_core import store
from ospo_core.config import EvalConfig, GateConfig, QuestionsConfig
from ospo_core.janus.image import sample_images
from ospo_core.judges.geneval import POSITION_PHRASES, plural
from ospo_core.plugins import tools_for
from ospo_core.records import EVAL, EVAL_QUESTIONS, NEGATIVES, PROMPTS, check_schema, image_cell, to_table
from ospo_core.stages.common import row_seed
from ospo_core.stages.questions import bind_structure, generate_questions
from ospo_core.stages.select import answer, local_score
from ospo_core.templates import vocabulary, with_article
from ospo_core.templates.parse import number_word

JUDGE_NOTES = {
    "self": "Judge: the evaluated model itself (its own yes/no answers, self-VQA), not GenEval's object detector nor "
            "T2I-CompBench's scorers. These numbers track the model across rounds; they are not benchmark scores.",
    "fixed": "Judge: a fixed Janus (a round's start model; a model outside the rounds judges itself) answering yes/no "
             "on every image, not GenEval's object detector nor T2I-CompBench's scorers; it does not change while "
             "a round trains. These numbers track models across rounds; they are not benchmark scores.",
    "geneval": "Judge: GenEval's rules (object detector and CLIP colour classification from local folders); the pass "
               "rate per tag is GenEval's score when the folders hold GenEval's models.",
    "vqa": "Judge: a VQA model (P(yes) / (P(yes) + P(no)), score = product over questions, as T2I-CompBench's BLIP-VQA) "
           "and CLIPScore for non-spatial prompts, from local folders; the questions are this evaluation's own.",
}
JUDGE_NOTE = JUDGE_NOTES["self"]
METRICS = ("mean_score", "all_yes")
SHIPPED_SETS = ("t2i-compbench", "geneval")

# T2I-CompBench's validation lists (file <category>_val.txt) and the questions-stage template family of each.
T2I_COMPBENCH_CATEGORIES = {
    "color": "attribute", "shape": "attribute", "texture": "attribute",
    "spatial": "layout", "3d_spatial": "layout", "numeracy": "layout",
    "non_spatial": "non-spatial", "complex": "complex",
}
QUESTION_FAMILIES = ("attribute", "layout", "non-spatial", "complex")
_FILE_KEYS = {"prompt", "id", "category", "tag", "tags", "include", "exclude"}
_ENTRY_KEYS = {"class", "count", "color", "position"}
_EPS = 1e-9  # metrics are means of floats: 0.3 - 0.1 must count as an improvement of 0.2


@dataclass(frozen=True)
class EvalPrompt:
    """One held-out prompt. `include`/`exclude` hold GenEval-style metadata; both empty = a plain prompt."""

    prompt_set: str
    prompt_id: str
    category: str
    prompt: str
    tags: tuple[str, ...] = ()
    include: tuple[dict, ...] = field(default=(), compare=False)
    exclude: tuple[dict, ...] = field(default=(), compare=False)

    @property
    def has_metadata(self) -> bool:
        return bool(self.include or self.exclude)


# ---------------------------------------------------------------- prompt sets


def _data_file(*parts: str):
    return files("ospo_core").joinpath("data", "benchmarks", *parts)


def prompt_set_name(spec: str) -> str:
    """The name a prompt set is stored under: the shipped set's name, or `<file stem>-<8 hex of its content>` (a
    folder name), so an edited file is a new prompt set."""
    if spec in SHIPPED_SETS:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"prompt set {spec!r} is neither one of {SHIPPED_SETS} nor an existing file; pass a shipped "
                         f"set's name or the path of a prompt file (one prompt per line, or JSONL with 'prompt')")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "prompts"
    return f"{stem[:60]}-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"


def load_prompt_set(spec: str, limit: int | None = None) -> list[EvalPrompt]:
    """The prompts of `spec` ("t2i-compbench", "geneval" or a file path), the first `limit` of each category."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for every prompt), got {limit}")
    if spec == "t2i-compbench":
        prompts = []
        for category in T2I_COMPBENCH_CATEGORIES:
            lines = _lines(_data_file("t2i-compbench", f"{category}_val.txt").read_text(encoding="utf-8"))
            prompts += [EvalPrompt(spec, f"{category}-{i:03d}", category, text) for i, text in enumerate(lines)]
    elif spec == "geneval":
        text = _data_file("geneval", "evaluation_metadata.jsonl").read_text(encoding="utf-8")
        prompts = _from_jsonl(text, spec, "GenEval metadata")
    else:
        name = prompt_set_name(spec)
        text = Path(spec).read_text(encoding="utf-8")
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if not first:
            raise ValueError(f"prompt file {spec} holds no prompts; write one prompt per line")
        if spec.endswith(".jsonl") or first.startswith("{"):
            prompts = _from_jsonl(text, name, f"prompt file {spec}")
        else:
            prompts = [EvalPrompt(name, f"{i:05d}", "all", line) for i, line in enumerate(_lines(text))]
    ids = [p.prompt_id for p in prompts]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"prompt set {spec}: prompt ids {repeated[:5]} are used more than once; give every prompt "
                         f"its own 'id'")
    if limit is None:
        return prompts
    taken: dict[str, int] = {}
    kept = []
    for p in prompts:
        taken[p.category] = taken.get(p.category, 0) + 1
        if taken[p.category] <= limit:
            kept.append(p)
    return kept


def _lines(text: str) -> list[str]:
    """Non-blank lines, stripped (the shipped lists mix CRLF and LF endings)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _from_jsonl(text: str, prompt_set: str, where: str) -> list[EvalPrompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}, line {number}: not valid JSON ({e})") from e
        prompts.append(_prompt_from_row(row, prompt_set, f"{where}, line {number}", default_id=f"{number - 1:05d}"))
    return prompts


def _prompt_from_row(row, prompt_set: str, where: str, default_id: str) -> EvalPrompt:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'prompt' field")
    unknown = set(row) - _FILE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; a prompt row may hold {sorted(_FILE_KEYS)}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    tags = row.get("tags", [row["tag"]] if "tag" in row else [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise ValueError(f"{where}: 'tag' must be a string and 'tags' a list of strings")
    category = row.get("category", tags[0] if tags else "all")
    if not isinstance(category, str) or not category:
        raise ValueError(f"{where}: 'category' must be a non-empty string")
    include = _entries(row.get("include", []), where, "include")
    exclude = _entries(row.get("exclude", []), where, "exclude")
    if exclude and not include:
        raise ValueError(f"{where}: 'exclude' needs an 'include' list (GenEval metadata names what must be there)")
    for i, entry in enumerate(include):
        if "position" in entry:
            relation, other = entry["position"]
            if not isinstance(other, int) or not 0 <= other < len(include) or other == i:
                raise ValueError(f"{where}: include[{i}].position refers to include[{other}], which is not another "
                                 f"entry of 'include'")
    return EvalPrompt(prompt_set, str(row.get("id", default_id)), category, prompt.strip(), tuple(tags),
                      include, exclude)


def _entries(value, where: str, name: str) -> tuple[dict, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: '{name}' must be a list of objects like {{\"class\": \"dog\", \"count\": 1}}")
    entries = []
    for i, entry in enumerate(value):
        at = f"{where}: {name}[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("class"), str) or not entry["class"].strip():
            raise ValueError(f"{at} needs a 'class' (the object's name)")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ValueError(f"{at}: unknown key(s) {sorted(unknown)}; expected {sorted(_ENTRY_KEYS)}")
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{at}: 'count' must be a whole number >= 1")
        if "color" in entry and (not isinstance(entry["color"], str) or not entry["color"].strip()):
            raise ValueError(f"{at}: 'color' must be a non-empty string")
        if "position" in entry:
            if name != "include":
                raise ValueError(f"{at}: 'position' is only meaningful in 'include'")
            position = entry["position"]
            if not (isinstance(position, list) and len(position) == 2 and position[0] in POSITION_PHRASES):
                raise ValueError(f"{at}: 'position' must be [relation, index] with relation one of "
                                 f"{sorted(POSITION_PHRASES)}, e.g. [\"left of\", 0]")
        entries.append({**entry, "count": count})
    return tuple(entries)


def prompts_hash(prompts: list[EvalPrompt]) -> str:
    """Content hash of a prompt selection (ids, categories, tags, text, metadata): keys the questions' cache."""
    document = [[p.prompt_set, p.prompt_id, p.category, list(p.tags), p.prompt, list(p.include), list(p.exclude)]
                for p in prompts]
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- questions


def geneval_questions(prompt: EvalPrompt) -> list[str]:
    """GenEval metadata -> yes/no questions, each expected to be answered "yes" by a faithful image.

    Per `include` entry: its existence ("Is there a dog?") or count ("Are there two dogs?"; "exactly" when an
    `exclude` entry caps that class at count + 1, which is how GenEval writes "exactly n"), then its colour ("Is the
    dog brown?"); then each relative position ("Is the dog to the right of the teddy bear?"); then an `exclude`
    entry that caps nothing included ("Are there fewer than three cats?").
    """
    entries = list(prompt.include)

    def name(entry: dict) -> str:
        return entry["class"] if entry["count"] == 1 else plural(entry["class"], prompt.prompt)

    def be(entry: dict) -> str:
        return "Is" if entry["count"] == 1 else "Are"

    caps = {e["class"]: e["count"] for e in prompt.exclude}
    questions, capped = [], set()
    for entry in entries:
        cls, n = entry["class"], entry["count"]
        exactly = caps.get(cls) == n + 1
        capped |= {cls} if exactly else set()
        if n == 1:
            questions.append(f"Is there exactly one {cls}?" if exactly else f"Is there {with_article(cls)}?")
        else:
            questions.append(f"Are there {'exactly ' if exactly else ''}{number_word(n)} {name(entry)}?")
        if "color" in entry:
            questions.append(f"{be(entry)} the {name(entry)} {entry['color']}?")
    for entry in entries:
        if "position" in entry:
            relation, other = entry["position"]
            questions.append(f"{be(entry)} the {name(entry)} {POSITION_PHRASES[relation]} the "
                             f"{name(entries[other])}?")
    for entry in prompt.exclude:
        if entry["class"] not in capped:
            m = entry["count"]
            questions.append(f"Is there no {entry['class']}?" if m == 1 else
                             f"Are there fewer than {number_word(m)} {plural(entry['class'], prompt.prompt)}?")
    return list(dict.fromkeys(questions))


def question_family(category: str) -> str:
    """The questions-stage template family of a category (T2I-CompBench's, a family's own name, else complex)."""
    if category in QUESTION_FAMILIES:
        return category
    return T2I_COMPBENCH_CATEGORIES.get(category, "complex")


@cache
def fallback_words() -> tuple[list[str], list[str], list[str]]:
    """(objects, attributes, predicates) the structured fallback may read from a held-out prompt: the built-in
    vocabulary plus GenEval's object classes and colours, with plurals so counted objects are found."""
    words = vocabulary()
    geneval = load_prompt_set("geneval")
    classes = list(dict.fromkeys(e["class"] for p in geneval for e in p.include))
    nouns = classes + words["people"]
    objects = [w for pair in words["objects"] for w in pair] + nouns + [plural(n) for n in nouns]
    colours = [e["color"] for p in geneval for e in p.include if "color" in e]
    attributes = words["colors"] + words["shapes"] + words["textures"] + colours
    predicates = words["relations_2d"] + words["relations_3d"] + words["actions"]
    return tuple(list(dict.fromkeys(w)) for w in (objects, attributes, predicates))


def eval_questions(prompts: list[EvalPrompt], bundle, cfg: QuestionsConfig) -> pa.Table:
    """Held-out prompts -> EVAL_QUESTIONS, one row per prompt, in prompt order.

    Prompts with metadata get `geneval_questions` (source "metadata"; `bundle` may be None when all have it). The
    others go through the questions stage as base prompts; a row the model fails (and the fallback cannot mend)
    stays with ok=False and the stage's reason.
    """
    plain = [p for p in prompts if not p.has_metadata]
    asked = {}
    if plain:
        if bundle is None:
            raise ValueError(f"{len(plain)} prompt(s) have no metadata (e.g. {plain[0].prompt!r}); a model must "
                             f"write their questions: pass a bundle")
        structured = cfg.fallback == "structured"
        rows = [{"item_id": p.prompt_id, "t2i_category": question_family(p.category), "sub_category": p.category,
                 "prompt": p.prompt, "ok": True,
                 **(bind_structure(p.prompt, *fallback_words()).columns() if structured else {})} for p in plain]
        table = generate_questions(to_table(rows, PROMPTS), to_table([], NEGATIVES), tools_for(bundle), cfg)
        asked = {row["item_id"]: row for row in table.to_pylist()}
    out = []
    for p in prompts:
        row = {"prompt_set": p.prompt_set, "prompt_id": p.prompt_id, "category": p.category, "tags": list(p.tags),
               "prompt": p.prompt}
        if p.has_metadata:
            out.append({**row, "questions": geneval_questions(p), "source": "metadata", "ok": True})
        else:
            made = asked[p.prompt_id]
            out.append({**row, **{k: made[k] for k in ("questions", "raw_output", "source", "ok", "reason")}})
    return to_table(out, EVAL_QUESTIONS)


# ---------------------------------------------------------------- images and self-VQA


_CELL = ("prompt_set", "prompt_id", "category", "tags", "prompt", "questions", "source")


def evaluate(questions: pa.Table, tools, cfg: EvalConfig) -> pa.Table:
    """EVAL_QUESTIONS -> EVAL: `images_per_prompt` images per prompt drawn by `tools.model`, each judged by
    `tools.judge` on its prompt's questions. Image k of a prompt is drawn with seed row_seed(cfg.seed, prompt_id,
    k), so another model meets the same prompts, questions and noise. A prompt without usable questions gets ok=False
    rows ("no_questions")."""
    check_schema(questions.schema, EVAL_QUESTIONS, table="eval_questions")
    prompts = questions.to_pylist()
    jobs = [(row, k, row_seed(cfg.seed, row["prompt_id"], k))
            for row in prompts if row["ok"] and row["questions"] for k in range(cfg.images_per_prompt)]
    drawn = {}
    if jobs:
        samples = sample_images(tools.model, [row["prompt"] for row, _, _ in jobs], cfg_weight=cfg.cfg_weight,
                                temperature=cfg.temperature, seed=[seed for _, _, seed in jobs],
                                batch_size=cfg.batch_size, compile_mode=cfg.compile_mode)
        drawn = {(row["prompt_id"], k): image_cell(image) for (row, k, _), image in zip(jobs, samples.images)}
    out = []
    for row in prompts:
        for k in range(cfg.images_per_prompt):
            cell = {**{c: row[c] for c in _CELL}, "k": k, "seed": row_seed(cfg.seed, row["prompt_id"], k)}
            image = drawn.get((row["prompt_id"], k))
            out.append({**cell, "image": image, "ok": True} if image else
                       {**cell, "ok": False, "reason": "no_questions"})
    return _judged(out, tools.judge, cfg.batch_size)


def rejudge(table: pa.Table, judge, batch_size: int = 8) -> pa.Table:
    """An EVAL table's images (same rows, prompts, seeds) answered again by another judge."""
    check_schema(table.schema, EVAL, table="eval")
    rows = [{c: r[c] for c in (*_CELL, "k", "seed", "image")} for r in table.to_pylist()]
    for row in rows:  # every drawn image is judged anew, whatever the first judge made of it
        row.update(ok=True) if row["image"] is not None else row.update(ok=False, reason="no_questions")
    return _judged(rows, judge, batch_size)


def _judged(rows: list[dict], judge, batch_size: int) -> pa.Table:
    """EVAL rows with `judge`'s answers filled in for the rows that hold an image (the others stay as they are)."""
    todo = [r for r in rows if r["ok"]]
    answers = judge.answer(todo, [r["questions"] for r in todo], batch_size) if todo else []
    custom = getattr(judge, "image_scores", None)
    scores = custom(todo, answers) if custom and todo else [None] * len(todo)
    for row, pairs, score in zip(todo, answers, scores):
        if pairs is None or any(p is None for p in pairs):
            row.update(ok=False, reason="corrupt_image" if pairs is None else judge.unknown_reason)
            continue
        p_yes, p_no = [y for y, _ in pairs], [n for _, n in pairs]
        row.update(p_yes=p_yes, p_no=p_no, score=local_score(p_yes, p_no) if score is None else score,
                   all_yes=all(answer(y, n) == "yes" for y, n in pairs), reason=None)
    return to_table(rows, EVAL)


# ---------------------------------------------------------------- metrics


class CategoryMetrics(BaseModel):
    model_config = ConfigDict(frozen=True)

    images: int  # rows: prompts x images_per_prompt
    scored: int  # images the model judged (ok rows)
    mean_score: float | None  # None: nothing scored
    all_yes: float | None


class TagMetrics(BaseModel):
    model_config = ConfigDict(frozen=True)

    scored: int
    pass_rate: float | None  # fraction of the tag's scored images with every answer "yes"


class EvalMetrics(BaseModel):
    """The metrics of one eval table. `overall[m]` is the mean over categories that have a value of m."""

    model_config = ConfigDict(frozen=True)

    prompt_set: str
    judge: str = JUDGE_NOTE
    images: int
    scored: int
    rejected: dict[str, int]  # reason -> rows
    categories: dict[str, CategoryMetrics]
    tags: dict[str, TagMetrics]

    @computed_field
    @property
    def overall(self) -> dict[str, float | None]:
        out = {}
        for metric in METRICS:
            values = [getattr(c, metric) for c in self.categories.values() if getattr(c, metric) is not None]
            out[metric] = sum(values) / len(values) if values else None
        return out


def eval_metrics(table: pa.Table, judge: str = "self") -> EvalMetrics:
    """Per-category mean local score and all-yes fraction, per-tag pass rate, from an EVAL table's ok rows."""
    check_schema(table.schema, EVAL, table="eval", columns=["prompt_set", "category", "tags", "score", "all_yes",
                                                            "ok", "reason"])
    rows = table.select(["prompt_set", "category", "tags", "score", "all_yes", "ok", "reason"]).to_pylist()
    sets = {r["prompt_set"] for r in rows}
    if len(sets) != 1:
        raise ValueError(f"an eval table holds one prompt set, this one holds {sorted(sets)}")

    def mean(values):
        return sum(values) / len(values) if values else None

    categories, tags, rejected = {}, {}, {}
    for category in dict.fromkeys(r["category"] for r in rows):
        mine = [r for r in rows if r["category"] == category]
        ok = [r for r in mine if r["ok"]]
        categories[category] = CategoryMetrics(images=len(mine), scored=len(ok),
                                               mean_score=mean([r["score"] for r in ok]),
                                               all_yes=mean([float(r["all_yes"]) for r in ok]))
    for tag in dict.fromkeys(t for r in rows for t in r["tags"]):
        ok = [r for r in rows if r["ok"] and tag in r["tags"]]
        tags[tag] = TagMetrics(scored=len(ok), pass_rate=mean([float(r["all_yes"]) for r in ok]))
    for r in rows:
        if not r["ok"]:
            rejected[r["reason"]] = rejected.get(r["reason"], 0) + 1
    return EvalMetrics(prompt_set=sets.pop(), judge=JUDGE_NOTES[judge], images=len(rows),
                       scored=sum(r["ok"] for r in rows), rejected=rejected, categories=categories, tags=tags)


def metrics_text(metrics: EvalMetrics) -> str:
    """A plain-text table of the metrics, with the judge note (for the terminal and logs)."""
    lines = [f"prompt set {metrics.prompt_set}: {metrics.scored} of {metrics.images} images scored"
             + (f" (rejected: {', '.join(f'{k}={v}' for k, v in metrics.rejected.items())})" if metrics.rejected
                else ""),
             f"{'category':<16}{'images':>8}{'scored':>8}{'mean_score':>12}{'all_yes':>10}"]
    for name, c in metrics.categories.items():
        lines.append(f"{name:<16}{c.images:>8}{c.scored:>8}{_fmt(c.mean_score):>12}{_fmt(c.all_yes):>10}")
    lines.append(f"{'overall':<32}{_fmt(metrics.overall['mean_score']):>12}{_fmt(metrics.overall['all_yes']):>10}")
    if metrics.tags:
        lines.append("pass rate per tag (every answer yes): " + ", ".join(
            f"{tag}={_fmt(t.pass_rate)}" for tag, t in metrics.tags.items()))
    lines.append(metrics.judge)
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------- the promotion gate


@dataclass(frozen=True)
class Decision:
    """Whether a round is promoted, and why: the metric before/after and each category's change (after - before;
    None where a side has no scored image)."""

    promote: bool
    reason: str
    metric: str
    before: float | None
    after: float | None
    deltas: dict[str, float | None]

    def to_dict(self) -> dict:
        return asdict(self)


def judge_drift(fixed: EvalMetrics, own: EvalMetrics, metric: str) -> dict[str, float | None]:
    """How much better the trained model judges its own images than the fixed judge does, per category and
    overall (own - fixed, on the same images): a round that teaches the model to say yes shows up here."""
    drift = {"overall": None if own.overall[metric] is None or fixed.overall[metric] is None
             else own.overall[metric] - fixed.overall[metric]}
    for name, c in fixed.categories.items():
        mine = own.categories.get(name)
        a, b = getattr(c, metric), getattr(mine, metric) if mine else None
        drift[name] = None if a is None or b is None else b - a
    return drift


def gate_decision(before: EvalMetrics, after: EvalMetrics, cfg: GateConfig) -> Decision:
    """Promote when `cfg.metric` rises by at least `min_improvement` and no category falls by more than
    `max_category_drop` (both evaluations on the same prompt set).

    >>> cat = lambda s: CategoryMetrics(images=1, scored=1, mean_score=s, all_yes=1.0)
    >>> m = lambda a, b: EvalMetrics(prompt_set="p", images=2, scored=2, rejected={}, tags={},
    ...                              categories={"color": cat(a), "spatial": cat(b)})
    >>> gate_decision(m(0.2, 0.4), m(0.5, 0.3), GateConfig(min_improvement=0.05, max_category_drop=0.05)).promote
    False
    >>> gate_decision(m(0.2, 0.4), m(0.5, 0.38), GateConfig(min_improvement=0.05, max_category_drop=0.05)).promote
    True
    """
    if before.prompt_set != after.prompt_set:
        raise ValueError(f"the gate compares evaluations on one prompt set, got {before.prompt_set!r} before and "
                         f"{after.prompt_set!r} after")
    metric = cfg.metric
    b, a = before.overall[metric], after.overall[metric]
    deltas = {}
    for name in dict.fromkeys([*before.categories, *after.categories]):
        x = getattr(before.categories[name], metric) if name in before.categories else None
        y = getattr(after.categories[name], metric) if name in after.categories else None
        deltas[name] = None if x is None or y is None else y - x
    problems = []
    if b is None or a is None:
        problems.append(f"no scored image {'before' if b is None else 'after'} training, nothing to compare")
    elif a - b < cfg.min_improvement - _EPS:
        problems.append(f"{metric} {b:.4f} -> {a:.4f} ({a - b:+.4f}) is below the required improvement "
                        f"{cfg.min_improvement:+.4f}")
    lost = [n for n, d in deltas.items() if d is None and n in before.categories
            and getattr(before.categories[n], metric) is not None]
    if lost:
        problems.append(f"categories {lost} have no scored image after training")
    drops = {n: d for n, d in deltas.items() if d is not None and -d > cfg.max_category_drop + _EPS}
    if drops:
        problems.append(f"categories fell by more than {cfg.max_category_drop:.4f}: "
                        + ", ".join(f"{n} {d:+.4f}" for n, d in drops.items()))
    if problems:
        return Decision(False, "not promoted: " + "; ".join(problems), metric, b, a, deltas)
    measured = {n: d for n, d in deltas.items() if d is not None}
    worst = min(measured, key=measured.get) if measured else None
    largest = f"; largest category change {worst} {measured[worst]:+.4f}" if worst else ""
    return Decision(True, f"promoted: {metric} {b:.4f} -> {a:.4f} ({a - b:+.4f} >= {cfg.min_improvement:+.4f})"
                    f"{largest} (tolerance -{cfg.max_category_drop:.4f})", metric, b, a, deltas)


# ---------------------------------------------------------------- where evaluations live


def round_eval_dir(home: Path, round_id: str, prompt_set: str, which: str) -> Path:
    """`runs/<round>/eval/<prompt set>/<which>/`: which = "start" (the model the round started from) or "trained".
    The questions both are judged by sit one level up, in `eval_questions/`."""
    if which not in ("start", "trained"):
        raise ValueError(f"which must be 'start' or 'trained', got {which!r}")
    return store.round_dir(home, round_id) / "eval" / store.check_round_id(prompt_set) / which


def model_eval_dir(home: Path, eval_id: str, prompt_set: str) -> Path:
    """`<home>/evals/<eval id>/<prompt set>/` for a model outside the rounds."""
    return Path(home) / "evals" / store.check_round_id(eval_id) / store.check_round_id(prompt_set)


def read_metrics(folder: Path) -> EvalMetrics | None:
    path = Path(folder) / "metrics.json"
    return EvalMetrics.model_validate_json(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class HistoryPoint:
    label: str
    metrics: EvalMetrics
    promoted: bool | None  # None: not a round's trained model (a start model, or a model outside the rounds)


def rounds_history(home: Path, prompt_set: str) -> list[HistoryPoint]:
    """The evaluations of the registered rounds on `prompt_set`, in registry order: the start model of the first
    evaluated round, then each round's trained model with its promotion decision."""
    points = []
    for entry in store.list_entries(home):
        trained = read_metrics(round_eval_dir(home, entry["round_id"], prompt_set, "trained"))
        start = read_metrics(round_eval_dir(home, entry["round_id"], prompt_set, "start"))
        if not points and start is not None:
            points.append(HistoryPoint("start", start, None))
        if trained is not None:
            points.append(HistoryPoint(entry["round_id"], trained, entry["promoted"]))
    return points


def history_panels(points: list[HistoryPoint]) -> dict[str, dict[str, list[float | None]]]:
    """metric -> line name ("overall" and each category) -> one value per point (None where missing)."""
    panels = {}
    for metric in METRICS:
        names = dict.fromkeys(n for p in points for n in p.metrics.categories)
        lines = {"overall": [p.metrics.overall[metric] for p in points]}
        for name in names:
            lines[name] = [getattr(p.metrics.categories[name], metric) if name in p.metrics.categories else None
                           for p in points]
        panels[metric] = lines
    return panels
