"""Stage 2a: object-level hard negatives (spec section 2a).

Every accepted base prompt gets three negatives, k = 0, 1, 2, each made by the perturbation the spec assigns to its
sub_category (replace / swap / drop, `templates.PERTURBATIONS`) through that family's few-shot template. The answer
is the first line after the last `Contrastive Prompt:` (`templates.parse.parse_negative`); a row that fails keeps its
raw output and reason. Row (item, k) is sampled with seed row_seed(cfg.seeds[k], item_id).

fallback="structured" rebuilds a failed negative from the base prompt's structured columns instead, marked
source="fallback" (raw_output still holds what the model said):
- replace: one attribute, count or relation word of the prompt is replaced by another one of the same kind from the
  round's own accepted prompts (same sub_category first, then any); counts take another number word one..ten;
- swap: the attributes of two objects are exchanged, else the numbers of two counted objects, else the two objects
  of a relation;
- drop: one object is removed and the rest is written as "a red cup and two lamps".
"""

from __future__ import annotations

import random

import pyarrow as pa

from ospo_core.config import PerturbConfig
from ospo_core.records import NEGATIVES, PROMPTS, to_table
from ospo_core.stages.common import ITEM_COLUMNS, ok_input_rows, row_seed, write_texts
from ospo_core.templates import negative_chat, perturbations_for, with_article
from ospo_core.templates.parse import ParseError, Structure, number_word, parse_negative, word_pattern

STRUCTURED_COLUMNS = ["objects", "attributes", "relations", "counts"]
Pools = dict[str, dict[str, dict[str, None]]]  # scope (sub_category or "*") -> kind -> ordered set of words


def perturb(prompts: pa.Table, tools, cfg: PerturbConfig, *, whole: dict[str, pa.Table] | None = None) -> pa.Table:
    """PROMPTS (its ok rows) -> NEGATIVES, one row per (item, k), written by `tools.writer`.

    `whole`: the round's whole input tables when `prompts` is a slice of them (a stage spread over workers); the
    structured fallback draws its words from the whole round, so a slice gives the rows the whole table would.
    """
    structured = cfg.fallback == "structured"
    columns = [*ITEM_COLUMNS, "prompt", *(STRUCTURED_COLUMNS if structured else [])]
    items = ok_input_rows(prompts, PROMPTS, columns, table_name="prompts", stage="perturb")
    jobs = [
        (item, k, method, row_seed(cfg.seeds[k], item["item_id"]))
        for item in items
        for k, method in enumerate(perturbations_for(item["sub_category"]))
    ]
    round_items = items if whole is None else ok_input_rows(whole["prompts"], PROMPTS, columns,
                                                            table_name="prompts", stage="perturb")
    return tools.writer.negatives(jobs, cfg, round_items)


def write_negatives(bundle, jobs: list[tuple[dict, int, str, int]], cfg: PerturbConfig,
                    round_items: list[dict]) -> pa.Table:
    """The paper's writer: the model answers each job's few-shot chat; a failed parse keeps its reason (or, with
    fallback=structured, is rebuilt from the structure with the round's words)."""
    structured = cfg.fallback == "structured"
    outputs = write_texts(
        bundle,
        [negative_chat(item["sub_category"], method, item["prompt"], seed=seed) for item, _, method, seed in jobs],
        [seed for *_, seed in jobs], cfg, "negatives",
    )
    pools = round_pools(round_items) if structured else {}
    rows = []
    for (item, k, method, seed), text in zip(jobs, outputs):
        row = {**{c: item[c] for c in ITEM_COLUMNS}, "k": k, "seed": seed, "perturbation": method,
               "prompt": item["prompt"], "raw_output": text, "source": "model"}
        try:
            row.update(negative_prompt=parse_negative(text, item["prompt"]), ok=True)
        except ParseError as error:
            row.update(ok=False, reason=error.reason)
            negative = None
            if structured:
                rng = random.Random(row_seed(seed, "fallback"))
                negative = structured_negative(item["prompt"], Structure.from_columns(item), method,
                                               pools, item["sub_category"], rng)
            if negative is not None:
                row.update(negative_prompt=negative, source="fallback", ok=True, reason=None)
        rows.append(row)
    return to_table(rows, NEGATIVES)


def round_pools(items: list[dict]) -> Pools:
    """The attribute and relation words of the round's accepted prompts, per sub_category and overall ("*")."""
    pools: Pools = {}
    for item in items:
        for scope in (item["sub_category"], "*"):
            pool = pools.setdefault(scope, {"attribute": {}, "predicate": {}})
            pool["attribute"].update(dict.fromkeys(a["attribute"] for a in item["attributes"]))
            pool["predicate"].update(dict.fromkeys(r["predicate"] for r in item["relations"]))
    return pools


def _alternatives(pools: Pools, sub_category: str, kind: str, old: str) -> list[str]:
    for scope in (sub_category, "*"):
        words = [w for w in pools.get(scope, {}).get(kind, {}) if w.lower() != old.lower()]
        if words:
            return words
    return []


def _substitute(text: str, mapping: dict[str, str], count: int = 0) -> str | None:
    """Replace whole-word occurrences of mapping's keys at once (count=1: only the first); None if none occurs."""
    lowered = {k.lower(): v for k, v in mapping.items()}
    result, n = word_pattern(mapping).subn(lambda m: lowered[m.group(0).lower()], text, count=count)
    return result if n else None


def _written_number(prompt: str, n: int) -> str | None:
    """How count n is spelled in the prompt ('three' or '3'), if it is."""
    return next((w for w in (number_word(n), str(n)) if word_pattern([w]).search(prompt)), None)


def structured_negative(
    prompt: str, structure: Structure, method: str, pools: Pools, sub_category: str, rng: random.Random
) -> str | None:
    """A negative of `prompt` built from its structure by `method` (see the module docstring); None if the
    structure offers nothing to perturb."""
    if method == "replace":
        options = [(a, _alternatives(pools, sub_category, "attribute", a)) for _, a in structure.attributes]
        options += [(_written_number(prompt, n), [number_word(m) for m in range(1, 11) if m != n])
                    for _, n in structure.counts]
        options += [(p, _alternatives(pools, sub_category, "predicate", p)) for _, p, _ in structure.relations]
        usable = [(old, pool) for old, pool in options if old and pool and word_pattern([old]).search(prompt)]
        if not usable:
            return None
        old, pool = rng.choice(usable)
        negative = _substitute(prompt, {old: rng.choice(pool)}, count=1)
    elif method == "swap":
        negative = next(filter(None, (_substitute(prompt, m) for m in _swaps(prompt, structure))), None)
    elif method == "drop":
        if len(structure.objects) < 2:
            return None
        dropped = rng.randrange(len(structure.objects))
        kept = [o for i, o in enumerate(structure.objects) if i != dropped]
        negative = " and ".join(_phrase(o, structure) for o in kept)
    else:
        raise ValueError(f"unknown perturbation {method!r}; expected replace, swap or drop")
    same = negative is None or " ".join(negative.lower().split()) == " ".join(prompt.lower().split())
    return None if same else negative


def _swaps(prompt: str, structure: Structure) -> list[dict[str, str]]:
    """Candidate exchanges, best first: two objects' attributes, two objects' numbers, a relation's two objects."""
    swaps = []
    attributes = list(dict(structure.attributes).items())  # one attribute per object
    if len(attributes) >= 2 and attributes[0][1].lower() != attributes[1][1].lower():
        swaps.append({attributes[0][1]: attributes[1][1], attributes[1][1]: attributes[0][1]})
    counts = [(_written_number(prompt, n), n) for _, n in structure.counts]
    if len(counts) >= 2 and counts[0][1] != counts[1][1] and counts[0][0] and counts[1][0]:
        swaps.append({counts[0][0]: counts[1][0], counts[1][0]: counts[0][0]})
    for subject, _, obj in structure.relations:
        if subject.lower() != obj.lower():
            swaps.append({subject: obj, obj: subject})
    return swaps


def _phrase(obj: str, structure: Structure) -> str:
    """An object written with its count or attributes: 'three cats', 'a red cup', 'a lamp'."""
    count = next((n for o, n in structure.counts if o == obj), None)
    if count is not None:
        return f"{number_word(count)} {obj}"
    attributes = [a for o, a in structure.attributes if o == obj]
    return with_article(" ".join([*attributes, obj]))
