"""The testbed model as its own judge: it looks at the PNG it drew and answers yes/no questions about it.

Janus-Pro answers through SigLIP features of the PNG; the testbed model's SigLIP is a 1-layer, 32-wide stand-in and
its understanding prompt (Janus-Pro's system prompt, spelt by a 600-token tokenizer) is 166 tokens long, which made a
judge too slow to train and to run on 2 CPU cores (TESTBED.md: 59% agreement with the oracle after 800 joint steps).
So the testbed's understanding path is simpler, in the way unified models with one discrete image vocabulary
(Chameleon, Show-o) read images:

1. **Image encoder** (`encode_png`): every 16-pixel patch of the PNG becomes the codebook entry whose drawing is
   nearest in pixels (the grid painter of `render.py` inverted, a fixed VQ encoder). It names each cell's content and
   knows nothing about counts, relations or the question.
2. **The model's own weights answer**: the 16 cell codes enter the language model through the model's image-token
   embeddings (`prepare_embeddings_for_image_generation`, the embeddings it draws with), inside the one chat
   template (a user turn with the image and the question, no system prompt, ~40 tokens); p_yes and p_no are read
   from its language-model head at the open assistant turn, exactly as `janus.score.score_yes_no` reads them.

Counting, binding colours to shapes and checking relations are all the language model's, learnt in pre-training
(`pretrain.train_judge`) from oracle-labelled questions on training captions, and trained further by nothing but
the rounds' LoRA updates of its drawing: whether the judge drifts as the model draws is measured, not assumed (it
does, hence `TestbedConfig.self_judge`). The shipped model's judge agrees with the oracle on ~90% of balanced held-out
questions; what it still gets wrong (true relations, a count asked where a look-alike stands in) is in TESTBED.md.
"""

from __future__ import annotations

import random
from functools import cache

import torch
from PIL import Image

from ospo_core.janus.chat import IMAGE_PLACEHOLDER, render_chat
from ospo_core.janus.load import JanusBundle
from ospo_core.janus.score import yes_no_ids
from ospo_core.janus.tiny import BOI, EOI
from ospo_core.templates import SUB_CATEGORIES, perturbations_for
from ospo_core.testbed.oracle import answers
from ospo_core.testbed.render import draw_scene
from ospo_core.testbed.world import CATEGORIES, WORLD, Description, World

CELL = 16  # pixels per cell in the PNGs the grid painter draws


# ---------------------------------------------------------------- 1. the image encoder: PNG -> cell codes


@cache
def _cell_drawings(world: World) -> torch.Tensor:
    """(cells, codebook, 3 * CELL * CELL): every cell position drawn with every codebook entry (the grid lines and
    the border differ between positions, so each position has its own drawings)."""
    out = torch.empty(world.cells, world.codebook_size, 3 * CELL * CELL)
    for token in range(world.codebook_size):
        picture = _patches(draw_scene([token] * world.cells, world, CELL), world)  # (cells, 3 * CELL * CELL)
        out[:, token] = picture
    return out


def _patches(image: Image.Image, world: World) -> torch.Tensor:
    pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).float() / 255
    pixels = pixels.view(world.grid, CELL, world.grid, CELL, 3).permute(0, 2, 4, 1, 3)  # (row, col, 3, CELL, CELL)
    return pixels.reshape(world.cells, -1)


def encode_png(image: Image.Image, world: World = WORLD) -> list[int] | None:
    """The cell codes of a drawn scene, raster order; None for a picture of another size (not a testbed drawing)."""
    if image.size != (world.grid * CELL, world.grid * CELL):
        return None
    patches = _patches(image, world)  # (cells, P)
    drawings = _cell_drawings(world)  # (cells, codebook, P)
    # squared distance up to the patch's own norm, which is the same for every entry: |d|^2 - 2 d.p
    distance = drawings.square().sum(-1) - 2 * torch.bmm(drawings, patches[:, :, None])[..., 0]  # (cells, codebook)
    return distance.argmin(-1).tolist()


# ---------------------------------------------------------------- 2. the model answers


def judge_chat(question: str) -> list[dict]:
    """A user turn holding the question, then the image (no system prompt: the testbed model never saw one).

    The question comes first because the model is causal: each image token can then check its cell against the
    question, and the answer position only has to gather them (with the image first, a 4-layer model has to match,
    count and compare cells at the answer position alone)."""
    return [{"role": "user", "content": [{"type": "text", "text": question.strip() + "\n"}, {"type": "image"}]}]


def judge_prompt_batch(bundle: JanusBundle, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Questions -> left-padded ids and mask (B, T), each holding <begin_of_image>, N image placeholders and
    <end_of_image> where the image goes, as Janus's processor expands an image."""
    image = BOI + IMAGE_PLACEHOLDER * bundle.num_image_tokens + EOI
    texts = [render_chat(bundle.processor, judge_chat(q)).replace(IMAGE_PLACEHOLDER, image, 1) for q in questions]
    enc = bundle.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=True)
    return enc["input_ids"].to(bundle.device), enc["attention_mask"].to(bundle.device)


def answer_logits(model, ids: torch.Tensor, mask: torch.Tensor, grids: torch.Tensor, image_id: int) -> torch.Tensor:
    """Language-model logits at the last position, (B, V) fp32, for prompts ids (B, T) about grids (B, N).
    Keeps the graph (pre-training backpropagates through it)."""
    embeds = model.get_input_embeddings()(ids)  # (B, T, D)
    cells = model.prepare_embeddings_for_image_generation(grids).to(embeds.dtype)  # (B, N, D)
    embeds = embeds.masked_scatter((ids == image_id)[..., None], cells)
    positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                        use_cache=False).last_hidden_state  # (B, T, D)
    return model.lm_head(hidden[:, -1]).float()  # (B, V)


@torch.no_grad()
def grid_yes_no(bundle: JanusBundle, grids: list[list[int]], questions: list[list[str]], *,
                batch_size: int = 256) -> list[list[tuple[float, float]]]:
    """For each grid, (p_yes, p_no) per question under the full-vocabulary softmax (as `score_yes_no`)."""
    if len(grids) != len(questions):
        raise ValueError(f"got {len(grids)} grids but {len(questions)} question lists; pass one list per grid")
    flat = [(g, q) for g, qs in zip(grids, questions) for q in qs]
    yes, no = yes_no_ids(bundle.tokenizer)
    image_id = bundle.token_id(IMAGE_PLACEHOLDER)
    scores: list[tuple[float, float]] = []
    for start in range(0, len(flat), batch_size):
        part = flat[start : start + batch_size]
        ids, mask = judge_prompt_batch(bundle, [q for _, q in part])
        grid = torch.tensor([g for g, _ in part], device=bundle.device)  # (B, N)
        probs = torch.softmax(answer_logits(bundle.model, ids, mask, grid, image_id), -1)
        scores += zip(probs[:, yes].max(-1).values.tolist(), probs[:, no].max(-1).values.tolist())
    it = iter(scores)
    return [[next(it) for _ in qs] for qs in questions]


# ---------------------------------------------------------------- questions with known answers


def question_batch(world: World, rng: random.Random, size: int, *, heldout: bool = False
                   ) -> list[tuple[list[int], str, bool]]:
    """`size` (scene, question, true answer) rows, half of them true, over the training (or held-out) captions.

    A row takes a caption and one of its `World.questions`, asked of a scene of the caption, of a perturbation of it
    (the hard negatives of a round), or of the caption's scene with one cell changed (an extra, missing or wrong
    object: the model's own drawing errors). The answer is the oracle's.
    """
    descriptions = {c: world.split(c)[1 if heldout else 0] for c in CATEGORIES}
    rows = []
    while len(rows) < size:
        category = rng.choice(CATEGORIES)
        d = world.wording(rng.choice(descriptions[category]), rng)
        scene = world.sample_scene(_scene_of(world, d, rng), rng)
        if rng.random() < 1 / 3:
            scene[rng.randrange(world.cells)] = rng.randrange(world.codebook_size)
        questions = world.questions(d)
        want = len(rows) % 2 == 0  # alternate yes and no
        matching = [q for q, a in zip(questions, answers(scene, questions, world)) if a is want]
        if matching:
            rows.append((scene, rng.choice(matching), want))
    return rows


def _scene_of(world: World, d: Description, rng: random.Random) -> Description:
    if rng.random() < 0.5:
        return d
    method = rng.choice(perturbations_for(SUB_CATEGORIES[d.category][1]))
    return world.perturb(d, method, rng) or world.perturb(d, "replace", rng) or d


def agreement(bundle: JanusBundle, rows: list[tuple[list[int], str, bool]]) -> float:
    """Fraction of rows where the model's answer (p_yes > p_no) is the true one."""
    scores = grid_yes_no(bundle, [r[0] for r in rows], [[r[1]] for r in rows])
    return sum((s[0][0] > s[0][1]) == r[2] for s, r in zip(scores, rows)) / len(rows)
