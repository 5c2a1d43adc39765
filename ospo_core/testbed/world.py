"""The shapes world: scenes on a small grid, captions for OSPO's categories, their negatives and exact questions.

A scene is a `grid x grid` array of cells in raster order (the order of the image tokens). A cell is empty or holds
one object with a colour and a shape. The testbed model's image codebook is exactly that: token 0 is an empty cell
and token 1 + c * len(shapes) + s is an object of colour c and shape s, so a sampled token grid *is* a scene and can
be judged without any vision model.

A caption names every object of its scene: "a red square" is a scene holding one red square and nothing else.
Captions come from a grammar over six of OSPO's prompt sub-categories (the keys of `PromptsConfig.quotas`):

| key        | example                                  | OSPO sub_category |
|------------|------------------------------------------|-------------------|
| color1     | a red square                             | attribute1_color  |
| color2     | a red square and a blue circle           | attribute2        |
| 2D_spatial | a red square left of a blue circle       | layout1           |
| numeracy1  | three green triangles                    | layout2           |
| numeracy2  | two red squares and one blue circle      | layout3           |
| complex    | two red squares above a blue circle      | complex           |

Relations hold between every object of the subject and every object of the object group: "left of" = a smaller
column, "above" = a smaller row. A `Description` is the structured form of a caption (the PROMPTS table's objects,
attributes, relations and counts); captions parse back into descriptions, so negatives and questions are built on
the structure, never on loose text.

Held-out captions: each category's caption space (up to the order of "and" and the direction of a relation) is
shuffled with `split_seed` and its first `heldout_fraction` is held out. Pre-training and the rounds' prompts use
the rest; the exact-scene metric uses only held-out captions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache, cached_property
from itertools import combinations, permutations, product

from ospo_core.config import TESTBED_SUB_CATEGORIES
from ospo_core.templates import with_article
from ospo_core.templates.parse import NUMBER_WORDS, number_word

# Each relation, its inverse (the same scene said from the other object) and the test on two cells (row, col).
RELATIONS: dict[str, tuple[str, Callable[[tuple, tuple], bool]]] = {
    "left of": ("right of", lambda a, b: a[1] < b[1]),
    "right of": ("left of", lambda a, b: a[1] > b[1]),
    "above": ("below", lambda a, b: a[0] < b[0]),
    "below": ("above", lambda a, b: a[0] > b[0]),
}
CANONICAL_RELATIONS = ("left of", "above")  # one of each inverse pair: the key of a relation caption
CATEGORIES = TESTBED_SUB_CATEGORIES  # the table above, in the spec's run order (which numbers item ids)
# Count pairs of a complex caption: at least one group of two, so it differs from 2D_spatial, and at most four
# objects, so every relation fits on a 4x4 grid.
COMPLEX_COUNTS = ((1, 2), (2, 1), (2, 2))


class CaptionError(ValueError):
    """Text that is not a caption of the world's grammar."""


@dataclass(frozen=True, order=True)
class Kind:
    """What a cell can hold: one colour and one shape."""

    colour: str
    shape: str


@dataclass(frozen=True)
class Group:
    """`count` objects of one kind."""

    kind: Kind
    count: int


@dataclass(frozen=True)
class Description:
    """The structured form of a caption: one or two groups of distinct kinds, optionally related.

    `numbered`: a group of one is written "one red square" instead of "a red square" (the numeracy style); it
    changes the wording, not the scene.
    """

    groups: tuple[Group, ...]
    relation: str | None = None
    numbered: bool = False

    def __post_init__(self):
        # Without a group of one the flag changes no word: normalise it, so parse(caption(d)) == d.
        if all(g.count > 1 for g in self.groups):
            object.__setattr__(self, "numbered", False)

    @property
    def counted(self) -> bool:
        """Does the caption state counts (the numeracy and complex categories)?"""
        return self.numbered or any(g.count > 1 for g in self.groups)

    @property
    def category(self) -> str:
        """The prompt sub-category key this description belongs to (see the module table)."""
        if self.relation is not None:
            return "complex" if self.counted else "2D_spatial"
        if len(self.groups) == 1:
            return "numeracy1" if self.counted else "color1"
        return "numeracy2" if self.counted else "color2"

    def key(self) -> tuple:
        """Equal for two descriptions of the same scenes: "and" is unordered, "right of" is "left of" reversed."""
        groups, relation = self.groups, self.relation
        if relation is None:
            return (tuple(sorted((g.kind, g.count) for g in groups)), None)
        if relation not in CANONICAL_RELATIONS:
            groups, relation = groups[::-1], RELATIONS[relation][0]
        return (tuple((g.kind, g.count) for g in groups), relation)

    @property
    def objects(self) -> int:
        return sum(g.count for g in self.groups)


@dataclass(frozen=True)
class World:
    """The world's size and vocabulary. Defaults: 4x4 cells, 4 colours x 3 shapes (13 image tokens)."""

    grid: int = 4
    colours: tuple[str, ...] = ("red", "blue", "green", "yellow")
    shapes: tuple[str, ...] = ("square", "circle", "triangle")
    max_count: int = 4
    heldout_fraction: float = 0.25
    split_seed: int = 0

    def __post_init__(self):
        if self.grid < 2 or len(self.colours) < 2 or len(self.shapes) < 2:
            raise ValueError("a world needs a grid of at least 2x2, two colours and two shapes")
        if not 2 <= self.max_count < len(NUMBER_WORDS) or 2 * self.max_count > self.grid**2:
            raise ValueError(f"max_count must be 2..{len(NUMBER_WORDS) - 1} and two groups of it must fit the grid")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError("heldout_fraction must lie strictly between 0 and 1")

    # ------------------------------------------------------------ cells and tokens

    @property
    def cells(self) -> int:
        return self.grid * self.grid

    @property
    def codebook_size(self) -> int:
        return 1 + len(self.colours) * len(self.shapes)

    @cached_property
    def kinds(self) -> tuple[Kind, ...]:
        """Every kind, in token order (token = 1 + index)."""
        return tuple(Kind(c, s) for c in self.colours for s in self.shapes)

    def token(self, kind: Kind) -> int:
        return 1 + self.kinds.index(kind)

    def kind_of(self, token: int) -> Kind | None:
        """The kind a token stands for; None for an empty cell."""
        if not 0 <= token < self.codebook_size:
            raise ValueError(f"token {token} is not a cell of this world (0..{self.codebook_size - 1}); was the grid "
                             "drawn by a model with another codebook?")
        return None if token == 0 else self.kinds[token - 1]

    def objects(self, tokens: list[int]) -> list[tuple[Kind, tuple[int, int]]]:
        """(kind, (row, col)) of every non-empty cell of a token grid, in raster order."""
        if len(tokens) != self.cells:
            raise ValueError(f"a scene of this world has {self.cells} cells, got {len(tokens)} tokens")
        return [(self.kind_of(t), divmod(i, self.grid)) for i, t in enumerate(tokens) if t != 0]

    # ------------------------------------------------------------ captions

    def caption(self, d: Description) -> str:
        phrases = [self._phrase(g, d.numbered) for g in d.groups]
        return f"{phrases[0]} {d.relation} {phrases[1]}" if d.relation else " and ".join(phrases)

    def _phrase(self, g: Group, numbered: bool) -> str:
        if g.count == 1:
            noun = f"{g.kind.colour} {g.kind.shape}"
            return f"one {noun}" if numbered else with_article(noun)
        return f"{number_word(g.count)} {g.kind.colour} {g.kind.shape}s"

    @cached_property
    def _caption_pattern(self) -> re.Pattern:
        counts = "|".join(["a", "an", *NUMBER_WORDS[1 : self.max_count + 1]])
        colours, shapes = "|".join(map(re.escape, self.colours)), "|".join(map(re.escape, self.shapes))
        group = r"(?P<n{0}>{1}) (?P<c{0}>{2}) (?P<s{0}>{3})(?P<p{0}>s?)"
        joins = "|".join(["and", *map(re.escape, RELATIONS)])
        return re.compile(rf"{group.format(1, counts, colours, shapes)}"
                          rf"(?: (?P<join>{joins}) {group.format(2, counts, colours, shapes)})?")

    def parse(self, text: str) -> Description:
        """A caption -> its description; CaptionError names what does not fit the grammar."""
        normalised = " ".join(text.strip().rstrip(".").lower().split())
        match = self._caption_pattern.fullmatch(normalised)
        if match is None:
            raise CaptionError(f"{text!r} is not a caption of the shapes world (e.g. 'two red squares above a blue "
                               f"circle'; colours {self.colours}, shapes {self.shapes}, counts up to "
                               f"{self.max_count})")
        groups, numbered = [], False
        for i in (1, 2) if match["join"] else (1,):
            word = match[f"n{i}"]
            count = 1 if word in ("a", "an") else NUMBER_WORDS.index(word)
            if (count > 1) != bool(match[f"p{i}"]):
                raise CaptionError(f"{text!r}: '{word} ... {match[f's{i}']}{match[f'p{i}']}' does not agree in number")
            numbered |= word == "one"
            groups.append(Group(Kind(match[f"c{i}"], match[f"s{i}"]), count))
        if len(groups) == 2 and groups[0].kind == groups[1].kind:
            raise CaptionError(f"{text!r} names the same kind twice; say its count instead ('two red squares')")
        relation = match["join"] if match["join"] not in (None, "and") else None
        return Description(tuple(groups), relation, numbered)

    # ------------------------------------------------------------ the caption space and its held-out split

    def space(self, category: str) -> list[Description]:
        """Every description of a category up to its key (see `Description.key`), in a fixed order."""
        pairs = list(combinations(self.kinds, 2))
        ordered = list(permutations(self.kinds, 2))
        counts = range(1, self.max_count + 1)
        if category == "color1":
            return [Description((Group(k, 1),)) for k in self.kinds]
        if category == "color2":
            return [Description((Group(a, 1), Group(b, 1))) for a, b in pairs]
        if category == "2D_spatial":
            return [Description((Group(a, 1), Group(b, 1)), r) for (a, b), r in product(ordered, CANONICAL_RELATIONS)]
        if category == "numeracy1":
            return [Description((Group(k, n),), numbered=True) for k, n in product(self.kinds, counts[1:])]
        if category == "numeracy2":  # one of each would be a color2 scene said with numbers
            return [Description((Group(a, m), Group(b, n)), numbered=True)
                    for (a, b), m, n in product(pairs, counts, counts) if m > 1 or n > 1]
        if category == "complex":
            return [Description((Group(a, m), Group(b, n)), r)
                    for (a, b), r, (m, n) in product(ordered, CANONICAL_RELATIONS, COMPLEX_COUNTS)]
        raise ValueError(f"the shapes world has no category {category!r}; it has {CATEGORIES}")

    @cache
    def split(self, category: str) -> tuple[tuple[Description, ...], tuple[Description, ...]]:
        """(train, held out) descriptions of a category, fixed by the world (`split_seed`, `heldout_fraction`)."""
        space = self.space(category)
        random.Random(f"{self.split_seed}:{category}").shuffle(space)
        n_heldout = max(1, round(self.heldout_fraction * len(space)))
        return tuple(space[n_heldout:]), tuple(space[:n_heldout])

    def wording(self, d: Description, rng: random.Random) -> Description:
        """One of the equivalent ways to say `d`: "and" in either order, a relation or its inverse."""
        if len(d.groups) == 2 and rng.random() < 0.5:
            inverse = RELATIONS[d.relation][0] if d.relation else None
            return replace(d, groups=d.groups[::-1], relation=inverse)
        return d

    # ------------------------------------------------------------ scenes

    def holds(self, relation: str, subjects: list[tuple[int, int]], objects: list[tuple[int, int]]) -> bool:
        """The relation between two sets of cells: true for every (subject, object) pair, false if either is empty."""
        test = RELATIONS[relation][1]
        return bool(subjects) and bool(objects) and all(test(a, b) for a in subjects for b in objects)

    def sample_scene(self, d: Description, rng: random.Random, tries: int = 10_000) -> list[int]:
        """A scene satisfying `d`, uniform over the placements that do (rejection sampling), as grid tokens."""
        for _ in range(tries):
            cells = rng.sample(range(self.cells), d.objects)
            placed, at = [], 0
            for g in d.groups:
                placed.append(cells[at : at + g.count])
                at += g.count
            where = [[divmod(c, self.grid) for c in group] for group in placed]
            if d.relation is None or self.holds(d.relation, where[0], where[1]):
                tokens = [0] * self.cells
                for g, group in zip(d.groups, placed):
                    for c in group:
                        tokens[c] = self.token(g.kind)
                return tokens
        raise ValueError(f"no scene of a {self.grid}x{self.grid} grid satisfies {self.caption(d)!r}")

    # ------------------------------------------------------------ decompositional questions

    def questions(self, d: Description) -> list[str]:
        """Yes/no questions that hold together exactly when a scene matches `d`.

        One per group (its exact count), one for the relation, and one for the total number of objects: the last
        is what makes the set exact (no object the caption did not ask for), in the spirit of OSPO v1's global
        question. "a red square left of a blue circle" -> "Is there one red square?", "Is there one blue circle?",
        "Is the red square left of the blue circle?", "Are there two shapes in total?".
        """
        out = [self._count_question(g.count, f"{g.kind.colour} {g.kind.shape}") for g in d.groups]
        if d.relation:
            subject, obj = d.groups
            verb = "Are" if subject.count > 1 else "Is"
            out.append(f"{verb} the {self._noun(subject)} {d.relation} the {self._noun(obj)}?")
        out.append(self._count_question(d.objects, "shape", " in total"))
        return out

    @staticmethod
    def _noun(g: Group) -> str:
        return f"{g.kind.colour} {g.kind.shape}{'s' if g.count > 1 else ''}"

    @staticmethod
    def _count_question(n: int, noun: str, tail: str = "") -> str:
        return f"Is there one {noun}{tail}?" if n == 1 else f"Are there {number_word(n)} {noun}s{tail}?"

    # ------------------------------------------------------------ hard negatives

    def perturb(self, d: Description, method: str, rng: random.Random) -> Description | None:
        """An object-level hard negative of `d` (OSPO's replace / swap / drop on the structure); None when the method
        has nothing to change. The result always means a different scene than `d`.

        replace: one colour, shape, count (counted captions) or relation becomes another of the world's.
        swap: the first exchange that changes the scene, in the order that suits the category: the two sides of a
            relation, then the groups' counts (counted captions), then their colours.
        drop: one of two groups is removed (with its relation).
        """
        if method == "replace":
            options = self._replacements(d)
        elif method == "swap":
            options = self._swaps(d)
        elif method == "drop":
            options = [Description((g,), None, d.numbered) for g in d.groups] if len(d.groups) == 2 else []
        else:
            raise ValueError(f"unknown perturbation {method!r}; expected replace, swap or drop")
        options = [o for o in options if self._valid(o) and o.key() != d.key()]
        return rng.choice(options) if options else None

    def _valid(self, d: Description) -> bool:
        return len({g.kind for g in d.groups}) == len(d.groups)

    def _replacements(self, d: Description) -> list[Description]:
        options = []
        for i, g in enumerate(d.groups):
            new_groups = [Group(Kind(c, g.kind.shape), g.count) for c in self.colours if c != g.kind.colour]
            new_groups += [Group(Kind(g.kind.colour, s), g.count) for s in self.shapes if s != g.kind.shape]
            if d.counted:
                new_groups += [Group(g.kind, n) for n in range(1, self.max_count + 1) if n != g.count]
            options += [replace(d, groups=d.groups[:i] + (new,) + d.groups[i + 1 :]) for new in new_groups]
        if d.relation:
            options += [replace(d, relation=r) for r in RELATIONS if r != d.relation]
        return options

    def _swaps(self, d: Description) -> list[Description]:
        if len(d.groups) != 2:
            return []
        a, b = d.groups
        sides = replace(d, groups=(b, a))
        counts = replace(d, groups=(Group(a.kind, b.count), Group(b.kind, a.count)))
        colours = replace(d, groups=(Group(Kind(b.kind.colour, a.kind.shape), a.count),
                                     Group(Kind(a.kind.colour, b.kind.shape), b.count)))
        if d.relation:
            order = [sides, counts, colours]
        elif d.category == "numeracy2":
            order = [counts, colours]
        else:
            order = [colours]
        changed = [s for s in order if self._valid(s) and s.key() != d.key()]
        return changed[:1]


WORLD = World()


def world_corpus(world: World = WORLD) -> str:
    """Text that makes the tiny tokenizer learn the world's words whole: every kind as caption and question."""
    lines = []
    for kind in world.kinds:
        one, many = Description((Group(kind, 1),)), Description((Group(kind, 2),))
        lines += [world.caption(one), world.caption(many), *world.questions(one), *world.questions(many)]
    for relation in RELATIONS:
        a, b = world.kinds[0], world.kinds[-1]
        lines.append(world.caption(Description((Group(a, 1), Group(b, 1)), relation)))
    lines += [" ".join(NUMBER_WORDS[1 : world.max_count + 1]), "shapes in total and"]
    return "\n" + "\n".join(lines * 4) + "\n"
