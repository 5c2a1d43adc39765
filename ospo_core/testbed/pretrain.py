"""Pre-train the testbed model: plain supervised next-token training on (caption -> scene grid) pairs.

Each step draws `batch_size` training captions (a category uniformly, then one of its training descriptions in a
random wording) and a fresh random scene for each (`World.sample_scene`). Two phases: `steps` on clean captions
(AdamW, cosine decay from the peak rate to a tenth), then `noisy_steps` at half the peak rate where a
`caption_noise` fraction of the scenes depict a perturbed caption instead, as web alt-text often misdescribes its
image. The start model so has the skills of the clean phase and the object-level confusions of the noisy one, the
situation OSPO's self-improvement is for. (Noise from the first step slows the learning of the skills themselves:
the same accuracy then costs more steps, and the rounds have less to recover.) Each step minimises the mean negative
log-likelihood of the scene's grid tokens under the generation head, through the same sequence the sampler and the
trainer use (`janus.score.image_token_logps`: gen prompt, then the image-token embeddings). A fraction of rows get
the sampler's unconditional prompt instead, so classifier-free guidance has an unconditional model. The whole
model trains (it starts random).

A third phase, `judge_steps`, teaches the same model to judge (`judge.py`): yes/no questions about scenes of the
training captions, their perturbations and corrupted copies, answered by the oracle, half of them "yes", trained by
cross-entropy on the answer token of the language-model head at the open assistant turn; each step also keeps
`judge_draw_weight` of the noisy phase's drawing loss, so that learning to understand does not unlearn drawing.
The aim is understanding ahead of generation, as in Janus-Pro (a judge that answers most questions right about
scenes the model mostly draws wrong): the shipped model's judge agrees with the oracle on ~90% of balanced held-out
questions while it draws 26% of held-out scenes exactly (TESTBED.md).

The checkpoint is a normal model folder (`save_janus`), loaded with `load_janus(folder)` like any Janus checkpoint,
plus `ospo_testbed.json`: the world and the pre-training settings it was made with, so a cached checkpoint is only
reused for the same world and settings (`ensure_checkpoint`).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ospo_core import store
from ospo_core.config import PretrainConfig
from ospo_core.janus.chat import IMAGE_PLACEHOLDER, unconditional_ids
from ospo_core.janus.image import gen_prompt_batch
from ospo_core.janus.load import JanusBundle, save_janus
from ospo_core.janus.score import image_token_logps, yes_no_ids
from ospo_core.templates import SUB_CATEGORIES, perturbations_for
from ospo_core.testbed.judge import agreement, answer_logits, judge_prompt_batch, question_batch
from ospo_core.testbed.model import build_testbed_janus
from ospo_core.testbed.world import CATEGORIES, WORLD, World

TESTBED_META = "ospo_testbed.json"
# The start model every machine shares, made by `ospo testbed --build-checkpoint ospo_core/data/testbed` with the
# default PretrainConfig (one thread, deterministic): CPU float differences compound over pre-training, so two
# machines pre-training for themselves start from different models.
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "testbed"


def training_batch(world: World, rng: random.Random, size: int, noise: float) -> tuple[list[str], torch.Tensor]:
    """(captions, scene tokens (B, N)) for `size` training captions, categories drawn uniformly.

    With probability `noise` a scene depicts a perturbation of its caption instead (one of the methods the spec
    assigns to the caption's sub-category, replace when that method has nothing to change): the caption errors of
    web alt-text, a wrong colour or shape or count, swapped attributes, a missing object.
    """
    splits = {c: world.split(c)[0] for c in CATEGORIES}
    captions, scenes = [], []
    for _ in range(size):
        category = rng.choice(CATEGORIES)
        d = world.wording(rng.choice(splits[category]), rng)
        captions.append(world.caption(d))
        if rng.random() < noise:
            method = rng.choice(perturbations_for(SUB_CATEGORIES[category][1]))
            d = world.perturb(d, method, rng) or world.perturb(d, "replace", rng)
        scenes.append(world.sample_scene(d, rng))
    return captions, torch.tensor(scenes)


def drawing_loss(bundle: JanusBundle, cfg: PretrainConfig, world: World, rng: random.Random, size: int,
                 noise: float) -> torch.Tensor:
    """Mean NLL of the scene tokens of `size` training captions (`training_batch`), an unconditional_prob share of
    them with the caption blanked. Keeps the graph."""
    tok = bundle.tokenizer
    captions, scenes = training_batch(world, rng, size, noise)  # scenes (B, N)
    ids, mask = gen_prompt_batch(bundle, captions)  # (B, T)
    blank = torch.tensor([rng.random() < cfg.unconditional_prob for _ in captions])  # (B,)
    unconditional = unconditional_ids(ids, bos_id=tok.bos_token_id, boi_id=bundle.token_id("<begin_of_image>"),
                                      pad_id=tok.pad_token_id)
    ids = torch.where(blank[:, None], unconditional, ids)
    return -image_token_logps(bundle.model, ids, mask, scenes).mean()


def pretrain(cfg: PretrainConfig, folder: str | Path, world: World = WORLD, log=print) -> Path:
    """Train a testbed model from random weights and save it as a checkpoint folder; returns the folder."""
    model, processor = build_testbed_janus(world, cfg.seed, cfg.hidden_size, cfg.num_layers)
    bundle = JanusBundle(model, processor, fingerprint="pretraining", source="testbed")
    train_drawing(bundle, cfg, world, log)
    train_judge(bundle, cfg, world, log)
    model.eval()
    folder = save_janus(bundle, folder)
    store.write_json(folder / TESTBED_META, checkpoint_meta(cfg, world))  # last, atomic: marks it complete
    return folder


def train_drawing(bundle: JanusBundle, cfg: PretrainConfig, world: World = WORLD, log=print) -> None:
    """The drawing phases: `steps` on clean captions, then `noisy_steps` on noisy ones (the module docstring)."""
    model = bundle.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    total = cfg.steps + cfg.noisy_steps

    def rate(step: int) -> float:  # multiplier of the peak rate: cosine to a tenth, then half the peak when noisy
        return 0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.steps)) if step < cfg.steps else 0.5

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    rng = random.Random(cfg.seed)
    model.train()
    started = time.perf_counter()
    for step in range(total):
        noise = cfg.caption_noise if step >= cfg.steps else 0.0
        loss = drawing_loss(bundle, cfg, world, rng, cfg.batch_size, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, total // 10) == 0 or step + 1 == total:
            log(f"pretrain step {step + 1}/{total}{' (noisy captions)' if noise else ''}: loss {loss.item():.4f} "
                f"({time.perf_counter() - started:.0f}s)")
    model.eval()


def train_judge(bundle: JanusBundle, cfg: PretrainConfig, world: World = WORLD, log=print) -> None:
    """The judge phase: cross-entropy of the true answer ("Yes"/"No") at the open assistant turn, plus
    `judge_draw_weight` x the noisy phase's drawing loss, for `judge_steps` steps (a fresh AdamW, cosine from the
    peak rate to a tenth). It has its own random stream, so it depends only on the drawing phases' weights."""
    if not cfg.judge_steps:
        return
    model = bundle.model
    yes, no = yes_no_ids(bundle.tokenizer)
    answer_ids = {True: yes[1], False: no[1]}  # "Yes" / "No", as the chat would write them
    image_id = bundle.token_id(IMAGE_PLACEHOLDER)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.judge_learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.judge_steps)))
    rng = random.Random(f"{cfg.seed}:judge")
    heldout = question_batch(world, random.Random(f"{cfg.seed}:judge-heldout"), 512, heldout=True)
    model.train()
    started = time.perf_counter()
    for step in range(cfg.judge_steps):
        rows = question_batch(world, rng, cfg.judge_batch_size)  # (scene, question, answer)
        ids, mask = judge_prompt_batch(bundle, [q for _, q, _ in rows])  # (B, T)
        grids = torch.tensor([scene for scene, _, _ in rows])  # (B, N)
        target = torch.tensor([answer_ids[a] for _, _, a in rows])  # (B,)
        loss = judge_loss = torch.nn.functional.cross_entropy(answer_logits(model, ids, mask, grids, image_id), target)
        if cfg.judge_draw_weight:
            loss = loss + cfg.judge_draw_weight * drawing_loss(bundle, cfg, world, rng, cfg.judge_draw_batch_size,
                                                               cfg.caption_noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, cfg.judge_steps // 10) == 0 or step + 1 == cfg.judge_steps:
            model.eval()  # no dropout in the testbed model; the held-out questions have their own random stream
            log(f"judge step {step + 1}/{cfg.judge_steps}: answer loss {judge_loss.item():.4f}, held-out agreement "
                f"with the oracle {agreement(bundle, heldout):.3f} on 512 balanced questions "
                f"({time.perf_counter() - started:.0f}s)")
            model.train()
    model.eval()


def checkpoint_meta(cfg: PretrainConfig, world: World = WORLD) -> dict:
    """What the checkpoint was made from, as JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps({"world": asdict(world), "pretrain": cfg.model_dump(mode="json")}))


def shipped_checkpoint(cfg: PretrainConfig, world: World = WORLD) -> Path | None:
    """The shipped start model if it was made with these settings for this world, else None."""
    meta = SHIPPED / TESTBED_META
    if meta.is_file() and json.loads(meta.read_text()) == checkpoint_meta(cfg, world):
        return SHIPPED
    return None


def ensure_checkpoint(cfg: PretrainConfig, folder: str | Path, world: World = WORLD, log=print) -> Path:
    """The checkpoint in `folder` if it was made for this world and these settings, else pre-train one there.

    A folder holding something else (another world, other settings, not a testbed checkpoint) is refused rather
    than overwritten.
    """
    folder = Path(folder)
    meta = folder / TESTBED_META
    if meta.is_file():
        if json.loads(meta.read_text()) == checkpoint_meta(cfg, world):
            log(f"reusing the pre-trained testbed checkpoint in {folder}")
            return folder
        raise ValueError(f"{folder} holds a testbed checkpoint made with another world or other pre-training "
                         "settings; pass another --checkpoint folder or delete this one")
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty and holds no testbed checkpoint; pass an empty or new folder")
    return pretrain(cfg, folder, world, log)
