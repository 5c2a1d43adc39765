"""OSPOTrainer: the overridden hooks run, only LoRA trains, margins rise, adapters reload, runs resume."""

import io
import json
import shutil

import pytest
import torch
from transformers import TrainerCallback

from ospo_core.config import TrainConfig
from ospo_core.janus.image import sample_images
from ospo_core.janus.load import load_janus
from ospo_core.janus.score import image_logprobs
from ospo_core.records import PAIRS, png_struct, to_table
from ospo_core.train import trainer as trainer_mod
from ospo_core.train.loss import OSPOLossConfig, ospo_loss
from ospo_core.train.trainer import NonFiniteLossError, train_ospo

PROMPTS = ["a red apple", "two cats", "a blue bus", "a green dog"]
NEGATIVES = ["a green apple", "three cats", "a red bus", "a blue dog"]
FAST = dict(batch_size=4, gradient_accumulation_steps=1, gradient_checkpointing=False, logging_steps=1)


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pairs(tiny):
    s = sample_images(tiny, PROMPTS + NEGATIVES, seed=list(range(8)))
    rows = [
        dict(item_id=f"000000{i}", t2i_category="attribute", sub_category="attribute1_color", rule="v2", prompt=p,
             rejected_prompt=n, chosen=png_struct(_png(s.images[i])), rejected=png_struct(_png(s.images[i + 4])),
             chosen_tokens=s.tokens[i].tolist(), rejected_tokens=s.tokens[i + 4].tolist(), ok=True)
        for i, (p, n) in enumerate(zip(PROMPTS, NEGATIVES))
    ]
    return to_table(rows, PAIRS)


def _margins(bundle, pairs):
    rows = pairs.to_pylist()
    chosen = torch.tensor([r["chosen_tokens"] for r in rows])
    rejected = torch.tensor([r["rejected_tokens"] for r in rows])
    prompts = [r["prompt"] for r in rows]
    lc = image_logprobs(bundle, prompts, chosen)[1]
    lr = image_logprobs(bundle, prompts, rejected)[1]
    ls = image_logprobs(bundle, [r["rejected_prompt"] for r in rows], chosen)[1]
    return lc, lr, ls


def test_trainer_loss_equals_ospo_loss_by_hand(pairs, tmp_path):
    """At step 0 the LoRA B matrices are zero, so the hand computation on the plain model must give the same loss."""
    bundle = load_janus("tiny", device="cpu")
    cfg = TrainConfig(max_steps=1, lora_dropout=0.0, **FAST)
    dataset = trainer_mod.pairs_to_dataset(pairs, bundle, cfg)
    args = trainer_mod.ospo_training_args(cfg, tmp_path, bundle.device)
    trainer = trainer_mod.OSPOTrainer(bundle.model, args, dataset, bundle.processor,
                                      peft_config=trainer_mod.lora_config(cfg))
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    plain = load_janus("tiny", device="cpu")
    lc, lr, ls = _margins(plain, pairs)
    per_token = image_logprobs(plain, PROMPTS, torch.tensor([r["chosen_tokens"] for r in pairs.to_pylist()]))[0]
    expected, _ = ospo_loss(lc, lr, ls, per_token, torch.ones_like(per_token), OSPOLossConfig())
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=0)
    assert "rewards/conditional_margin" in trainer._metrics["train"]


def test_training_raises_margins_only_lora_changes_and_adapter_reloads(pairs, tmp_path):
    bundle = load_janus("tiny", device="cpu")
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    lc0, lr0, ls0 = _margins(bundle, pairs)
    cfg = TrainConfig(max_steps=30, learning_rate=1e-3, save_steps=30, **FAST)
    result = train_ospo(pairs, bundle, cfg, tmp_path / "run")
    assert result.steps == 30
    logged = set(result.history.column("metric").to_pylist())
    assert {"rewards/margins", "rewards/conditional_margin", "nll/chosen", "loss"} <= logged  # our hook ran
    base = bundle.model.get_base_model() if hasattr(bundle.model, "get_base_model") else bundle.model
    for name, value in base.state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(value, before[key]), f"{name} changed but only LoRA weights may train"
    reloaded = load_janus("tiny", device="cpu", adapters=[result.adapter_dir])
    lc1, lr1, ls1 = _margins(reloaded, pairs)
    assert (lc1 - lr1).mean() > (lc0 - lr0).mean() + 0.02  # SimPO margin rises
    assert (lc1 - ls1).mean() > (lc0 - ls0).mean() + 0.02  # conditional margin rises
    assert lc1.mean() > lc0.mean() + 0.01  # chosen NLL falls
    # the saved adapter reproduces the trained model's log-probs
    trained = load_janus("tiny", device="cpu")
    trained.model = bundle.model.eval()
    torch.testing.assert_close(_margins(trained, pairs)[0], lc1, atol=1e-5, rtol=0)


class CountSteps(TrainerCallback):
    def __init__(self):
        self.ran = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ran.append(state.global_step)


TIMING = {f"{split}_{m}" for split in ("train", "eval") for m in ("runtime", "samples_per_second", "steps_per_second")}  # wall-clock


def _assert_same_history(resumed, full):
    """Same rows in the same order, same values (timing aside); the same final metrics."""
    rows = [[r for r in result.history.to_pylist() if r["metric"] not in TIMING] for result in (resumed, full)]
    assert [(r["step"], r["metric"]) for r in rows[0]] == [(r["step"], r["metric"]) for r in rows[1]]
    assert [r["value"] for r in rows[0]] == pytest.approx([r["value"] for r in rows[1]], abs=1e-6)
    finals = [{k: v for k, v in result.final_metrics.items() if k not in TIMING} for result in (resumed, full)]
    assert finals[0] == pytest.approx(finals[1], abs=1e-6)


def _interrupted_at_3(pairs, cfg, run, run_key):
    """A run that died between its checkpoints at steps 3 and 6 (before its adapter was written)."""
    train_ospo(pairs, load_janus("tiny", device="cpu"), cfg, run, run_key=run_key)
    shutil.rmtree(run / "checkpoint-6")
    shutil.rmtree(run / "adapter")


def test_resumed_run_logs_what_an_uninterrupted_run_logs(pairs, tmp_path):
    """Checkpoint at step 3, logs at steps 1, 2, 4, 6: step 3's loss and metrics are not logged when the run dies, so
    the resumed run must carry them to the step-4 log, and train_loss must average all 6 steps."""
    cfg = TrainConfig(max_steps=6, learning_rate=1e-3, save_steps=3, lora_dropout=0.0, **{**FAST, "logging_steps": 2})
    full = train_ospo(pairs, load_janus("tiny", device="cpu"), cfg, tmp_path / "full", run_key="k")
    run = tmp_path / "cut"
    _interrupted_at_3(pairs, cfg, run, "k")
    steps = CountSteps()
    resumed = train_ospo(pairs, load_janus("tiny", device="cpu"), cfg, run, callbacks=[steps], run_key="k")
    assert steps.ran == [4, 5, 6]  # it continued from checkpoint-3, not from step 1
    _assert_same_history(resumed, full)
    # one of the 4 pairs is held out and validated at the end (step 6 is no multiple of eval_steps)
    assert (full.final_metrics["pairs/train"], full.final_metrics["pairs/validation"]) == (3, 1)
    validated = {r["metric"] for r in full.history.to_pylist() if r["step"] == 6}
    assert {"eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_loss/sft"} <= validated
    losses = [r["value"] for r in full.history.to_pylist() if r["metric"] == "loss"]  # steps 1, 2, 4, 6
    assert full.final_metrics["train_loss"] == pytest.approx((losses[0] + losses[1] + 2 * losses[2] + 2 * losses[3])
                                                             / 6, abs=1e-6)


def test_checkpoint_of_another_run_key_is_set_aside_not_resumed(pairs, tmp_path):
    cfg = TrainConfig(max_steps=6, learning_rate=1e-3, save_steps=3, **FAST)
    run = tmp_path / "run"
    _interrupted_at_3(pairs, cfg, run, "old-settings")

    class SetAsideWhileTraining(CountSteps):
        def on_step_end(self, args, state, control, **kwargs):
            super().on_step_end(args, state, control, **kwargs)
            assert (run / trainer_mod.SUPERSEDED / "checkpoint-3").is_dir()  # kept until the new adapter is saved

    steps = SetAsideWhileTraining()
    result = train_ospo(pairs, load_janus("tiny", device="cpu"), cfg, run, callbacks=[steps], run_key="new-settings")
    assert steps.ran == [1, 2, 3, 4, 5, 6]  # started fresh
    assert result.steps == 6 and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / trainer_mod.SUPERSEDED).exists()
    assert trainer_mod.checkpoint_record(run / "checkpoint-6") == {"run_key": "new-settings"}


def test_resume_false_and_unrecorded_checkpoints_start_fresh(pairs, tmp_path):
    cfg = TrainConfig(max_steps=3, save_steps=3, **FAST)
    run = tmp_path / "run"
    train_ospo(pairs, load_janus("tiny", device="cpu"), cfg, run, run_key="k")
    trainer_mod.claim_checkpoints(run, "k", resume=False)
    assert trainer_mod.last_checkpoint(run) is None and (run / trainer_mod.SUPERSEDED / "checkpoint-3").is_dir()
    # a checkpoint from before run records (no RunRecord in its trainer state) belongs to no run
    shutil.move(run / trainer_mod.SUPERSEDED / "checkpoint-3", run / "checkpoint-3")
    state_file = run / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["RunRecord"]
    state_file.write_text(json.dumps(state))
    trainer_mod.claim_checkpoints(run, None, resume=True)
    assert trainer_mod.last_checkpoint(run) is None
    # a half-written checkpoint (no trainer state yet) is removed
    (run / "checkpoint-9").mkdir()
    trainer_mod.claim_checkpoints(run, None, resume=True)
    assert not (run / "checkpoint-9").exists()


def test_bad_pairs_tables(pairs, tiny, tmp_path):
    cfg = TrainConfig(max_steps=1, **FAST)
    with pytest.raises(ValueError, match="no selected"):
        trainer_mod.pairs_to_dataset(pairs.slice(0, 0), tiny, cfg)
    with pytest.raises(ValueError, match="rejected_prompt"):
        trainer_mod.pairs_to_dataset(pairs.drop_columns(["rejected_prompt"]), tiny, cfg)
    rows = pairs.to_pylist()
    rows[0]["chosen_tokens"] = [tiny.codebook_size] * tiny.num_image_tokens
    with pytest.raises(ValueError, match="codebook"):
        trainer_mod.pairs_to_dataset(to_table(rows, PAIRS), tiny, cfg)


def test_nan_loss_stops_and_keeps_last_checkpoint(pairs, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = trainer_mod.ospo_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 2 else loss), metrics

    monkeypatch.setattr(trainer_mod, "ospo_loss", flaky)
    cfg = TrainConfig(max_steps=5, save_steps=2, **FAST)
    with pytest.raises(NonFiniteLossError, match="checkpoint"):
        train_ospo(pairs, load_janus("tiny", device="cpu"), cfg, tmp_path)
    assert (tmp_path / "checkpoint-2").is_dir()
