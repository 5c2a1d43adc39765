"""The geneval judge: GenEval's procedure (Ghosh et al. 2023, evaluation/evaluate_images.py) over an object
detector and CLIP from local folders, answering the questions it can read back into GenEval's clauses.

GenEval's rules, as its evaluation code applies them (numbers from there; the code here is ours):
- detections of a class are kept when their confidence is above 0.3, or 0.9 for a prompt tagged "counting"
  (strictly above), most confident first, at most 16 per class; its IoU de-duplication is off by default (1.0);
- an include clause {class, count} holds when at least `count` objects are kept; an exclude clause {class, count}
  holds when fewer than `count` are kept ("exactly n" = include n + exclude n + 1);
- colour: the `count` most confident objects are cropped to their box (pixels outside the object's mask grey #999
  when the detector gives a mask) and CLIP classifies each among 10 colours with three prompt templates; the clause
  holds when at least `count` of them are the asked colour;
- position: A is `left of`/`right of`/`above`/`below` B when, with the centre offset shrunk by 0.1 x (A's + B's box
  size) per axis, the shrunk offset over the full offset's length is beyond 0.5 on that axis; every counted A must
  stand so to every counted B, and both groups must have matched (count and colour) first.
An image is correct when every clause holds. Here each question is one clause, answered p_yes = 1 or 0, so GenEval's
"correct" is the evaluation's all-yes, and the per-tag pass rate is GenEval's score.

Questions are read back into clauses (`parse_question`): the evaluation's GenEval questions ("Are there exactly two
clocks?", "Is the dog brown?", "Is the dog to the right of the teddy bear?") always parse; a model's own question
parses when it is in the same grammar ("Is there a red apple?") and names a class the detector knows (an
open-vocabulary detector such as OWL-ViT knows GenEval's 80 classes). Any other question is left unanswered
("geneval_unknown_question"), as the oracle does.

Detectors: any transformers object detector with `id2label` (DETR, Deformable DETR, ... through
AutoModelForObjectDetection; boxes, no masks) or a zero-shot one queried with class names (OWL-ViT / OWLv2).
GenEval itself uses Mask2Former (mmdetection) whose thresholds these are; another detector's confidences differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ospo_core.judges import folders
from ospo_core.templates.parse import NUMBER_WORDS, number_value

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0  # 1.0 = no de-duplication by overlap
POSITION_THRESHOLD = 0.1
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
BACKGROUND = "#999"
# GenEval's relative positions (`"position": [relation, index]`) and how a question words them.
POSITION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_RELATION_WORDS = {**{v: k for k, v in POSITION_PHRASES.items()}, "on the left of": "left of",
                   "on the right of": "right of", "left of": "left of", "right of": "right of", "on top of": "above",
                   "under": "below", "beneath": "below"}
COUNTING_SUB_CATEGORIES = ("layout2", "layout3")  # a round's numeracy prompts count like GenEval's counting tag


def plural(noun: str, prompt: str = "") -> str:
    """The plural of `noun`: as the prompt writes it after a number word ("two benchs"), else by English rules."""
    if prompt:
        number = "|".join([*NUMBER_WORDS[2:], r"\d+"])
        written = re.search(rf"\b(?:{number})\s+({re.escape(noun)}\w*)", prompt, re.IGNORECASE)
        if written:
            return written.group(1)
    head, _, last = noun.rpartition(" ")
    irregular = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
                 "knife": "knives", "sheep": "sheep", "skis": "skis", "scissors": "scissors"}
    if last in irregular:
        word = irregular[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        word = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


# ---------------------------------------------------------------- detections and GenEval's rules


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float
    mask: np.ndarray | None = field(default=None, compare=False)  # (H, W) bool, when the detector segments


def compute_iou(a, b) -> float:
    """GenEval's IoU, with its +1 pixel box sizes."""
    area = lambda box: max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)  # noqa: E731
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_detections(detections: dict[str, list[Detection]], counting: bool) -> dict[str, list[Detection]]:
    """Per class: confidence strictly above the threshold (0.9 when counting, else 0.3), most confident first, at
    most MAX_OBJECTS, then GenEval's overlap de-duplication (off at NMS_THRESHOLD = 1); classes left empty vanish."""
    threshold = COUNTING_THRESHOLD if counting else THRESHOLD
    kept = {}
    for name, found in detections.items():
        order = sorted((d for d in found if d.score > threshold), key=lambda d: -d.score)[:MAX_OBJECTS]
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            order = [d for d in order if NMS_THRESHOLD == 1 or compute_iou(best.box, d.box) < NMS_THRESHOLD]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(a: Detection, b: Detection) -> set[str]:
    """The relations of A to B: the centre offset, each axis shrunk by POSITION_THRESHOLD x (A's + B's size on it),
    divided by the offset's length; beyond 0.5 on an axis gives left/right of or above/below (image y grows down)."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)  # (object, corner, xy)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    shrunk = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def classify_colours(crop_features: torch.Tensor, colour_features: torch.Tensor) -> list[str]:
    """CLIP zero-shot colour of each crop: argmax over COLORS of crop (N, D) . colour classifier (C, D); a tie goes
    to the colour listed first."""
    if crop_features.shape[0] == 0:
        return []
    return [COLORS[i] for i in (crop_features @ colour_features.T).argmax(dim=1).tolist()]


def colour_crop(image: Image.Image, detection: Detection) -> Image.Image:
    """The object as GenEval shows it to CLIP: outside its mask (if any) grey, cropped to its box."""
    image = image.convert("RGB")
    if detection.mask is not None:
        blank = Image.new("RGB", image.size, color=BACKGROUND)
        image = Image.composite(image, blank, Image.fromarray(detection.mask.astype(np.uint8) * 255))
    # GenEval crops to the box as given; a box that is degenerate or outside the image keeps at least one pixel
    x0, y0, x1, y1 = (int(round(v)) for v in detection.box)
    x0, y0 = min(max(x0, 0), image.width - 1), min(max(y0, 0), image.height - 1)
    return image.crop((x0, y0, max(min(x1, image.width), x0 + 1), max(min(y1, image.height), y0 + 1)))


# ---------------------------------------------------------------- questions as GenEval clauses


@dataclass(frozen=True)
class Clause:
    """One GenEval condition: `kind` count (at least / exactly / fewer than n of cls), colour (n of cls are
    colour) or position (the n cls are `relation` the other_n other)."""

    kind: str  # "at_least" | "exactly" | "fewer" | "colour" | "position"
    cls: str
    n: int | None = None  # None: from the other clauses about cls in the same list (default 1)
    colour: str | None = None
    relation: str | None = None
    other: str | None = None


def _noun(text: str, classes: tuple[str, ...]) -> str | None:
    """The class a noun phrase names (singular, plural or GenEval's -s plural), else None."""
    text = text.strip().lower()
    text = re.sub(r"^(?:a|an|the)\s+", "", text)
    for name in classes:
        if text in (name, plural(name), name + "s", name + "es"):
            return name
    return None


def _coloured(text: str, classes: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(colour, class) of "red apple"; (None, class) of "apple"."""
    words = text.strip().lower().split(" ", 1)
    if len(words) == 2 and words[0] in COLORS:
        return words[0], _noun(words[1], classes)
    return None, _noun(text, classes)


def _count(word: str) -> int | None:
    return int(word) if word.isdigit() else number_value(word.lower())


_COLOURS = "|".join(COLORS)
_RELATIONS = "|".join(sorted((re.escape(r) for r in _RELATION_WORDS), key=len, reverse=True))


def parse_question(question: str, classes: tuple[str, ...]) -> Clause | None:
    """The GenEval clause a yes/no question asks, or None when it is outside the grammar or names no known class."""
    q = re.sub(r"\s+", " ", question.strip()).rstrip("?").strip()
    if m := re.fullmatch(rf"(?:is|are) the (.+?) ({_RELATIONS}) the (.+)", q, re.IGNORECASE):
        subject, other = _noun(m[1], classes), _noun(m[3], classes)
        return Clause("position", subject, relation=_RELATION_WORDS[m[2].lower()], other=other) \
            if subject and other else None
    if m := re.fullmatch(rf"(?:is|are) the (.+) ({_COLOURS})", q, re.IGNORECASE):
        cls = _noun(m[1], classes)
        return Clause("colour", cls, colour=m[2].lower()) if cls else None
    if m := re.fullmatch(r"is there exactly one (.+)", q, re.IGNORECASE):
        cls = _noun(m[1], classes)
        return Clause("exactly", cls, 1) if cls else None
    if m := re.fullmatch(r"is there no (.+)", q, re.IGNORECASE):
        cls = _noun(m[1], classes)
        return Clause("fewer", cls, 1) if cls else None
    if m := re.fullmatch(r"is there (?:a|an) (.+)", q, re.IGNORECASE):
        colour, cls = _coloured(m[1], classes)
        return None if not cls else Clause("colour", cls, 1, colour) if colour else Clause("at_least", cls, 1)
    if m := re.fullmatch(r"are there fewer than (\w+) (.+)", q, re.IGNORECASE):
        n, cls = _count(m[1]), _noun(m[2], classes)
        return Clause("fewer", cls, n) if n and cls else None
    if m := re.fullmatch(r"are there (exactly )?(\w+) (.+)", q, re.IGNORECASE):
        n = _count(m[2])
        colour, cls = _coloured(m[3], classes)
        if not n or not cls:
            return None
        if colour:
            return Clause("colour", cls, n, colour)
        return Clause("exactly" if m[1] else "at_least", cls, n)
    return None


def clause_counts(clauses: list[Clause | None]) -> dict[str, int]:
    """How many of each class the list asks for (its count clauses; 1 when none), which colour and position
    clauses that leave n open use, as GenEval's include entry gives its count to its colour and position."""
    counts: dict[str, int] = {}
    for c in clauses:
        if c is not None and c.n is not None and c.kind in ("at_least", "exactly", "colour"):
            counts[c.cls] = max(counts.get(c.cls, 0), c.n)
    return counts


def check_clauses(clauses: list[Clause | None], kept: dict[str, list[Detection]],
                  colours: dict[str, list[str]]) -> list[bool | None]:
    """Each clause against the kept detections and the colours of each class's counted objects (most confident
    first; `colours[cls]` covers at least its counted objects); None where there is no clause."""
    counts = clause_counts(clauses)
    asked_colour = {c.cls: c.colour for c in clauses if c is not None and c.kind == "colour"}

    def group(cls: str) -> list[Detection] | None:
        """The counted objects of cls if its group matched: enough of them, and of its asked colour."""
        n = counts.get(cls, 1)
        found = kept.get(cls, [])[:n]
        if len(found) < n:
            return None
        if cls in asked_colour and colours.get(cls, [])[:n].count(asked_colour[cls]) < n:
            return None
        return found

    out = []
    for c in clauses:
        if c is None:
            out.append(None)
            continue
        n = c.n if c.n is not None else counts.get(c.cls, 1)
        found = len(kept.get(c.cls, []))
        if c.kind == "at_least":
            out.append(found >= n)
        elif c.kind == "exactly":
            out.append(found >= n and found < n + 1)
        elif c.kind == "fewer":
            out.append(found < n)
        elif c.kind == "colour":
            out.append(found >= n and colours.get(c.cls, [])[:n].count(c.colour) >= n)
        else:
            subjects, targets = group(c.cls), group(c.other)
            out.append(subjects is not None and targets is not None and all(
                c.relation in relative_position(a, b) for a in subjects for b in targets))
    return out


# ---------------------------------------------------------------- the judge


@cache
def geneval_classes() -> tuple[str, ...]:
    """GenEval's object classes (the COCO names in its shipped metadata), longest first so "wine glass" wins."""
    import json
    from importlib.resources import files

    text = files("ospo_core").joinpath("data", "benchmarks", "geneval", "evaluation_metadata.jsonl").read_text()
    names = {e["class"] for line in text.splitlines() if line.strip() for e in json.loads(line).get("include", [])}
    return tuple(sorted(names, key=lambda n: (-len(n), n)))


class _Detector:
    """A transformers object detector from a folder: closed-set (id2label) or zero-shot (queried by class name)."""

    def __init__(self, folder: Path):
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection, AutoTokenizer

        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        self.zero_shot = config.model_type in ("owlvit", "owlv2")
        if self.zero_shot:
            from transformers import AutoModelForZeroShotObjectDetection

            self.model = folders.from_folder(AutoModelForZeroShotObjectDetection, folder)
            self.tokenizer = folders.from_folder(AutoTokenizer, folder)
            self.classes = geneval_classes()
        else:
            self.model = folders.from_folder(AutoModelForObjectDetection, folder)
            labels = [config.id2label[i] for i in sorted(config.id2label)]
            self.classes = tuple(sorted({label.lower() for label in labels}, key=lambda n: (-len(n), n)))
            self.labels = [label.lower() for label in labels]
        self.model.to(folders.device()).eval()
        self.processor = folders.from_folder(AutoImageProcessor, folder)

    @torch.no_grad()
    def detect(self, image: Image.Image, queries: list[str]) -> dict[str, list[Detection]]:
        """Every box the detector reports (no threshold yet), by class."""
        sizes = torch.tensor([[image.height, image.width]], device=self.model.device)  # beside the boxes
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.model.device, self.model.dtype)
        if self.zero_shot:
            if not queries:
                return {}
            text = self.tokenizer(queries, padding="max_length", truncation=True,
                                  max_length=self.model.config.text_config.max_position_embeddings,
                                  return_tensors="pt").to(self.model.device)
            outputs = self.model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                 pixel_values=pixels)
            names = queries
        else:
            outputs = self.model(pixel_values=pixels)
            names = self.labels
        result = self.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)[0]
        found: dict[str, list[Detection]] = {}
        for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist()):
            if 0 <= label < len(names):
                found.setdefault(names[label], []).append(Detection(tuple(box), float(score)))
        return found


class GenEvalJudge:
    """GenEval's detector + CLIP procedure as a judge; `source` is a folder with detector/ and clip/."""

    name = "geneval"
    code = (folders,)  # besides this module, which the cache key hashes as the class's own file
    columns = ()
    unknown_reason = "geneval_unknown_question"

    def __init__(self, model=None, source: str | None = None, same: bool = False):
        del model, same  # judges with its own models
        self.detector_dir = folders.judge_folder(source, "detector", self.name)
        self.clip_dir = folders.judge_folder(source, "clip", self.name)
        self.identity = f"{source}:{folders.folder_identity(source)}"

    @cached_property
    def detector(self) -> _Detector:
        return _Detector(self.detector_dir)

    @cached_property
    def clip(self):
        return folders.load_clip(str(self.clip_dir))

    def colour_features(self, cls: str) -> torch.Tensor:
        """GenEval's zero-shot colour classifier of a class: per colour the mean of its three templates' unit text
        embeddings, renormalised; (len(COLORS), D)."""
        texts = [t.format(c=c, cls=cls) for c in COLORS for t in COLOR_TEMPLATES]
        features = folders.clip_text_features(self.clip, texts).view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1)
        return features / features.norm(dim=-1, keepdim=True)

    def judge_image(self, image: Image.Image, questions: list[str], counting: bool) -> list[tuple[float, float] | None]:
        clauses = [parse_question(q, self.detector.classes) for q in questions]
        queries = sorted({name for c in clauses if c is not None for name in (c.cls, c.other) if name})
        kept = keep_detections(self.detector.detect(image, queries), counting)
        counts = clause_counts(clauses)
        colours = {}
        for cls in sorted({c.cls for c in clauses if c is not None and c.kind == "colour"}):
            crops = [colour_crop(image, d) for d in kept.get(cls, [])[: counts.get(cls, 1)]]
            colours[cls] = classify_colours(folders.clip_image_features(self.clip, crops),
                                            self.colour_features(cls)) if crops else []
        return [None if ok is None else (1.0, 0.0) if ok else (0.0, 1.0)
                for ok in check_clauses(clauses, kept, colours)]

    def answer(self, rows, questions, batch_size):
        from ospo_core.records import decode_image

        out = []
        for row, qs in zip(rows, questions):
            image = decode_image(row["image"])
            counting = "counting" in (row.get("tags") or []) or row.get("sub_category") in COUNTING_SUB_CATEGORIES
            out.append(None if image is None else self.judge_image(image, qs, counting))
        return out

