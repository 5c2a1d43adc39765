"""Runs one long stage (render, vqa or train) on fixed inputs, so a test can SIGKILL it and run it again.

python tests/helpers/crash_driver.py STAGE HOME   -> runs the stage to completion (resuming what is there)
"""

import os
import sys
import time
from functools import partial

for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRL_EXPERIMENTAL_SILENCE"):
    os.environ.setdefault(key, "1")

from transformers import TrainerCallback  # noqa: E402

from ospo_core.config import RenderConfig, TrainConfig, VQAConfig  # noqa: E402
from ospo_core.janus.load import load_janus  # noqa: E402
from ospo_core.records import DENSE, PAIRS, QUESTIONS, to_table  # noqa: E402
from ospo_core.pipeline import Stage  # noqa: E402
from ospo_core.stages.render import render  # noqa: E402
from ospo_core.stages.vqa import self_vqa  # noqa: E402
from ospo_core.train.trainer import train_ospo  # noqa: E402
from tasks.context import StageContext, keep_model  # noqa: E402
from tasks.runner import read_ref, run_stage  # noqa: E402

ITEMS = [(f"00000{i:02d}", f"a red apple number {i}", f"a green apple number {i}") for i in range(6)]
SLOW = float(os.environ.get("CRASH_DRIVER_DELAY", "0"))  # seconds per shard/step, so a test can kill mid-way


def dense_table():
    return to_table([dict(item_id=i, t2i_category="attribute", sub_category="attribute1_color", k=k, seed=k,
                          prompt=p, negative_prompt=n, dense_prompt=f"{p}, view {k}",
                          negative_dense_prompt=f"{n}, view {k}", ok=True, source="model")
                     for i, p, n in ITEMS for k in range(2)], DENSE)


def questions_table():
    return to_table([dict(item_id=i, side="base", k=-1, prompt=p, questions=[f"Is there {p}?", "Is it red?"],
                          ok=True) for i, p, _ in ITEMS], QUESTIONS)


def context(home: str, bundle) -> StageContext:
    return StageContext(round_id="crash", home=home, model="tiny", fingerprint=bundle.fingerprint, shard_rows=2)


def _given(table, tools, cfg):
    return table


def write_input(ctx, name, table):
    """Inputs are written through the same path as stage outputs, so they have refs (path, hash)."""
    return run_stage(Stage(name, f"write-{name}", partial(_given, table)), ctx, None, {})[0]


def slow_render(dense, tools, cfg):
    time.sleep(SLOW)
    return render(dense, tools, cfg)


def slow_vqa(images, questions, tools, cfg):
    time.sleep(SLOW)
    return self_vqa(images, questions, tools, cfg)


SLOW_IMAGES = Stage("images", "render", slow_render, reads=("dense",), code=(render,), uses=("decoder",),
                    shard="dense")
SLOW_VQA = Stage("vqa", "self-vqa", slow_vqa, reads=("images", "questions"), code=(self_vqa,), uses=("judge",),
                 shard="images")


def main(stage: str, home: str) -> None:
    bundle = load_janus("tiny", device="cpu")
    ctx = context(home, bundle)
    keep_model(ctx, bundle)
    dense = write_input(ctx, "dense", dense_table())
    images, _ = run_stage(SLOW_IMAGES, ctx, RenderConfig(batch_size=2), {"dense": dense})
    if stage == "render":
        return
    questions = write_input(ctx, "questions", questions_table())
    run_stage(SLOW_VQA, ctx, VQAConfig(batch_size=2), {"images": images, "questions": questions})
    if stage == "vqa":
        return
    rows = read_ref(images).to_pylist()
    pairs = to_table([dict(item_id=b["item_id"], t2i_category=b["t2i_category"], sub_category=b["sub_category"],
                           rule="v2", prompt=ITEMS[n // 2][1], rejected_prompt=ITEMS[n // 2][2], chosen=b["image"],
                           rejected=r["image"], chosen_tokens=b["image_tokens"], rejected_tokens=r["image_tokens"],
                           ok=True)
                      for n, (b, r) in enumerate(zip(rows[::2], rows[1::2])) if n % 2 == 0], PAIRS)

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(SLOW)

    cfg = TrainConfig(max_steps=10, save_steps=2, batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3,
                      lora_dropout=0.0, gradient_checkpointing=False, logging_steps=1)
    train_ospo(pairs, load_janus("tiny", device="cpu"), cfg, os.path.join(home, "train"), callbacks=[Slow()])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
