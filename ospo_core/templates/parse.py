"""Parsers for the text stages' model outputs.

Each parser returns what it read or raises `ParseError(reason)`, where `reason` is the code the stage stores in its
table (`ok=False`, the raw output kept beside it). The rules follow the spec (sections 1, 2a, 2b, 3a); where the
authors' code is lax, we take the spec's recommended strict reading and say so below.

Reason codes:
- "bad_format": a prompt answer that does not split into exactly 3 parts on ';'.
- "empty": nothing left after the marker / after stripping.
- "role_token": the text contains a chat role token or end-of-sentence text: the model ran into a new chat turn, so
  the parsed text is not an answer.
- "no_marker": the required marker (`Contrastive Prompt:`, `Questions: `) is missing.
- "template_leak": the parsed negative or dense prompt contains a template step ("Step 1." ...).
- "echo": the negative prompt only repeats the input prompt.
- "no_dense_prompt" / "no_negative_dense_prompt": the `Step 2. Prompt 1 Dense:` / `Step 4. Prompt 2 Dense:` line is
  missing.
- "no_questions": no question survived.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ospo_core.janus.chat import ASSISTANT, EOS_TEXT, USER

ROLE_TOKENS = (USER, ASSISTANT, EOS_TEXT)
# Spec 1: a prompt containing any of these (case-sensitive substrings) is rejected, except for non-spatial/complex.
FORBIDDEN_IN_PROMPT = ("\n", "/", "-", "color", "shape", "texture", "spatial", "numeracy", "(", ")")
NEGATIVE_MARKER = "Contrastive Prompt:"
QUESTIONS_MARKER = "Questions: "
_DENSE_1 = re.compile(r"Step 2\. Prompt 1 Dense: (.+)")
_DENSE_2 = re.compile(r"Step 4\. Prompt 2 Dense: (.+)")
_STEP = re.compile(r"\bStep \d+\.")
_TUPLE = re.compile(r"\(([^()]*)\)")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


class ParseError(ValueError):
    """A model output that does not parse; `reason` is the code stored in the stage table."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class PromptAnswer:
    """One stage-1 answer: `Prompt: <prompt>; Concepts and relations: <concepts>; Relation: <relation>`."""

    prompt: str
    concepts: str
    relation: str


@dataclass(frozen=True)
class Structure:
    """What a prompt is made of, read from its relation tuples: the structured columns of the PROMPTS table."""

    objects: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()  # (object, attribute)
    relations: tuple[tuple[str, str, str], ...] = ()  # (subject, predicate, object)
    counts: tuple[tuple[str, int], ...] = ()  # (object, count)

    def columns(self) -> dict:
        """The Arrow columns (records.PROMPTS) of this structure."""
        return {
            "objects": list(self.objects),
            "attributes": [{"object": o, "attribute": a} for o, a in self.attributes],
            "relations": [{"subject": s, "predicate": p, "object": o} for s, p, o in self.relations],
            "counts": [{"object": o, "count": n} for o, n in self.counts],
        }

    @classmethod
    def from_columns(cls, row: dict) -> Structure:
        return cls(
            objects=tuple(row["objects"] or ()),
            attributes=tuple((a["object"], a["attribute"]) for a in row["attributes"] or ()),
            relations=tuple((r["subject"], r["predicate"], r["object"]) for r in row["relations"] or ()),
            counts=tuple((c["object"], c["count"]) for c in row["counts"] or ()),
        )


def _reject_role_tokens(*texts: str) -> None:
    for text in texts:
        if any(token in text for token in ROLE_TOKENS):
            raise ParseError("role_token", repr(text[:80]))


def parse_prompt_answer(text: str) -> PromptAnswer:
    """Spec 1, rule 1: exactly 3 parts on ';', each part = the text after its last ':', stripped.

    >>> parse_prompt_answer("Prompt: a navy cat;Concepts and relations: navy cat;Relation: (cat, navy)")
    PromptAnswer(prompt='a navy cat', concepts='navy cat', relation='(cat, navy)')
    """
    parts = text.split(";")
    if len(parts) != 3:
        raise ParseError("bad_format", f"{len(parts)} parts on ';', expected 3")
    # Checked on the whole parts: "(a, b)\n\n<|User|>: ..." would hide the role token before the last ':'.
    _reject_role_tokens(*parts)
    prompt, concepts, relation = (part.split(":")[-1].strip() for part in parts)
    if not prompt:
        raise ParseError("empty", "no prompt text")
    return PromptAnswer(prompt, concepts, relation)


def forbidden_substring(prompt: str) -> str | None:
    """Spec 1, rule 2: the first stop substring the prompt contains, if any."""
    return next((s for s in FORBIDDEN_IN_PROMPT if s in prompt), None)


def number_value(word: str) -> int | None:
    """'three' -> 3, '7' -> 7, anything else -> None (number words zero..ten and digits)."""
    word = word.strip().lower()
    if word.isdigit():
        return int(word)
    return NUMBER_WORDS.index(word) if word in NUMBER_WORDS else None


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def parse_relation(text: str) -> Structure:
    """Relation tuples -> structure: `(bench, blue)` is an attribute, `(apples, three)` a count, `(a, on, b)` a
    relation.

    A relation side written with its attributes ("fluffy white cat" after "(cat, fluffy white)") is mapped back to the
    bare object, so objects are listed once. Tuples of other sizes carry no binding we can use and are skipped (the
    raw relation text stays in the table).
    """
    attributes, relations, counts = [], [], []
    for inner in _TUPLE.findall(text):
        parts = [p.strip() for p in inner.split(",")]
        if any(not p for p in parts):
            continue
        if len(parts) == 2:
            obj, value = parts
            if number_value(value) is not None:
                counts.append((obj, number_value(value)))
            elif number_value(obj) is not None:
                counts.append((value, number_value(obj)))
            else:
                attributes.append((obj, value))
        elif len(parts) == 3:
            relations.append(tuple(parts))
    described = {f"{attribute} {obj}": obj for obj, attribute in attributes}
    relations = [(described.get(s, s), p, described.get(o, o)) for s, p, o in relations]
    named = [o for o, _ in attributes] + [o for o, _ in counts] + [x for s, _, o in relations for x in (s, o)]
    return Structure(
        objects=tuple(dict.fromkeys(named)),
        attributes=tuple(attributes),
        relations=tuple(relations),
        counts=tuple(counts),
    )


def word_pattern(words) -> re.Pattern:
    """A case-insensitive pattern matching any of `words` as whole words, longest first ("dark red" before "red")."""
    alternation = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".").strip()


def parse_negative(text: str, prompt: str) -> str:
    """Spec 2a (recommended strict reading): the first non-empty line after the last `Contrastive Prompt:`, with
    `<pos>` removed.

    Only that line is kept because the answer format puts the contrastive prompt on one line; what follows is the
    model continuing past its answer. A missing marker is a failure (the authors' V2 code would keep the whole
    output). An answer equal to the input prompt (ignoring case, spacing and a final '.') is an "echo".
    """
    if NEGATIVE_MARKER not in text:
        raise ParseError("no_marker", f"no {NEGATIVE_MARKER!r}")
    answer = text.rsplit(NEGATIVE_MARKER, 1)[1].strip().split("\n", 1)[0]
    answer = " ".join(answer.replace("<pos>", " ").replace("</pos>", " ").split())
    _reject_role_tokens(answer)
    if not answer:
        raise ParseError("empty", "nothing after the marker")
    if _STEP.search(answer):
        raise ParseError("template_leak", answer[:80])
    if _normalise(answer) == _normalise(prompt):
        raise ParseError("echo", answer[:80])
    return answer


def parse_dense(text: str) -> tuple[str, str]:
    """Spec 2b: (dense prompt, negative dense prompt) = the rest of the `Step 2. Prompt 1 Dense:` and
    `Step 4. Prompt 2 Dense:` lines (first match each). Either one missing or bad fails both."""
    found = []
    for pattern, missing in ((_DENSE_1, "no_dense_prompt"), (_DENSE_2, "no_negative_dense_prompt")):
        match = pattern.search(text)
        if match is None:
            raise ParseError(missing)
        dense = match.group(1).strip()
        _reject_role_tokens(dense)
        if not dense:
            raise ParseError("empty", missing)
        if _STEP.search(dense):
            raise ParseError("template_leak", dense[:80])
        found.append(dense)
    return found[0], found[1]


def parse_questions(text: str) -> list[str]:
    """Spec 3a: after the last `Questions: `, split on '?', keep chunks whose strip().rstrip('.') is non-empty, as
    chunk.strip() + '?'; chunks with a role token are dropped; duplicates removed keeping the first (the authors'
    set() is order-random).

    >>> parse_questions("Concepts and relations: cat, dog; Questions: Is there a cat? Is there a dog?.")
    ['Is there a cat?', 'Is there a dog?']
    """
    if QUESTIONS_MARKER not in text:
        raise ParseError("no_marker", f"no {QUESTIONS_MARKER!r}")
    chunks = text.rsplit(QUESTIONS_MARKER, 1)[1].split("?")
    questions = [
        chunk.strip() + "?"
        for chunk in chunks
        if chunk.strip().rstrip(".") and not any(token in chunk for token in ROLE_TOKENS)
    ]
    questions = list(dict.fromkeys(questions))
    if not questions:
        raise ParseError("no_questions")
    return questions
