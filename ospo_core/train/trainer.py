"""OSPOTrainer: TRL's DPOTrainer with the Janus image-token loss in place of its language-model loss.

TRL 1.16's DPOTrainer computes log-probs with a fused LM head patched onto the model; Janus scores images with its
*generation* head, so `compute_loss` is replaced entirely (the parent's `_compute_loss` is never called). What we
keep from TRL: dataset preparation (`_prepare_dataset`), the reference pass with the adapter disabled
(`compute_ref_log_probs`), PEFT wiring, metric logging, checkpointing and resume.

One step: the collator stacks the B pairs into 3B rows (x_c, y_w), (x_c, y_l), (x_r, y_w); one forward gives the
per-token image log-probs of all of them (logits at image positions only); `ospo_loss` does the rest.

Validation. `validation_fraction` of the pairs (a stable hash of item_id) is held out and scored every `eval_steps`
steps and at the end with the same loss (TRL's `eval_` metrics: loss terms, rewards/margins, accuracies), as the
authors validate every 50 steps; the history table holds both (the summary plots them, ospo_core.report).

Resume. Every checkpoint records the key of the run that wrote it (`run_key`: the stage's cache key) and the loss
accumulators the Trainer does not save (`RunRecord`). Only a checkpoint with the same key is resumed, and a resumed
run logs the same history and final metrics as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import torch
from peft import LoraConfig
from transformers import PrinterCallback, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from trl import DPOConfig, DPOTrainer

from ospo_core.config import OSPOLossConfig, TrainConfig
from ospo_core.janus.load import LORA_TARGET_REGEX, JanusBundle, write_adapter_meta
from ospo_core.janus.score import image_token_logps
from ospo_core.records import TRAIN_HISTORY
from ospo_core.train.data import OSPOCollator, pairs_to_dataset, skipped_without_masks, tokenize_prompts
from ospo_core.train.loss import ospo_loss, weighted_mean_logps

logger = logging.getLogger("ospo.trainer")
# Checkpoints of another run wait here (under the output folder) until this run's adapter is saved.
SUPERSEDED = "superseded"


@dataclass
class OSPOConfig(DPOConfig):
    r"""DPOConfig plus the OSPO objective.

    Parameters:
        objective (`OSPOLossConfig`, defaults to the paper's v2 values): the loss (`"ospo"`: SimPO + CoPO + SFT,
            reference-free; `"dpo"`: the pair term is sigmoid DPO against the model with the adapter disabled), its
            scales β₁, γ₁/β₁, β₂, γ₂/β₂, the weights of its three terms and the label smoothing ε. A `TrainConfig` is
            one, so the round's settings reach the loss without a copy; DPOConfig's own `beta`, `loss_type` and
            `label_smoothing` are not read.
    """

    objective: OSPOLossConfig = field(default_factory=OSPOLossConfig, metadata={"help": "the OSPO objective"})


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/inf loss; the checkpoints written before it are kept."""


class RunRecord(TrainerCallback, ExportableState):
    """What every checkpoint's trainer_state.json holds for us (the Trainer's stateful-callback slot): the key of the
    run that wrote it, and `carry`, the loss accumulators the Trainer does not save (see OSPOTrainer)."""

    def __init__(self, run_key: str | None, restore: Callable[[dict], None]):
        self.run_key = run_key
        self.carry: dict = {}
        self.restore = restore  # puts a resumed checkpoint's carry back into the trainer

    def state(self) -> dict:
        return {"args": {"run_key": self.run_key}, "attributes": {"carry": self.carry}}

    def on_train_begin(self, args, state, control, **kwargs):
        # Called after the Trainer has reset its loss accumulators; `state` is the resumed checkpoint's, if any.
        carry = state.stateful_callbacks.get(type(self).__name__, {}).get("attributes", {}).get("carry")
        if carry:
            self.restore(carry)


class OSPOTrainer(DPOTrainer):
    def __init__(self, model, args: OSPOConfig, train_dataset, processing_class, peft_config=None, *,
                 run_key: str | None = None, callbacks: list[TrainerCallback] | None = None, **kwargs):
        collator = OSPOCollator(pad_token_id=processing_class.tokenizer.pad_token_id)
        self.record = RunRecord(run_key, restore=self._restore_carry)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         data_collator=collator, peft_config=peft_config, callbacks=[*(callbacks or []), self.record],
                         **kwargs)
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        frozen_ok = all("lora_" in n and "language_model" in n for n in trainable)
        if not trainable or not frozen_ok:
            raise RuntimeError(f"only the language model's LoRA weights may train; trainable: {trainable[:5]}...")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Tokenise the gen prompts once, up front (TRL's hook; its own LM tokenisation does not apply)."""
        return dataset.map(tokenize_prompts, fn_kwargs={"processor": processing_class},
                           desc=f"Tokenising {dataset_name} gen prompts")

    def _janus(self, model):
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped

    def concatenated_forward(self, model, inputs) -> torch.Tensor:
        """Per-token image log-probs of all 3B rows in one forward, (3B, N) fp32. The language model runs through
        `model` as the trainer wrapped it (DDP/FSDP), so data-parallel gradients are synchronised."""
        return image_token_logps(self._janus(model), inputs["prompt_ids"], inputs["prompt_mask"],
                                 inputs["image_tokens"], trunk=model)

    def _sequence_logps(self, per_token: torch.Tensor, inputs) -> torch.Tensor:
        mask = torch.ones_like(per_token)
        return weighted_mean_logps(per_token, mask, inputs.get("token_weights"))  # (rows,)

    def compute_ref_log_probs(self, model, inputs):
        """ℓ_ref(x_c, y_w), ℓ_ref(x_c, y_l) with the LoRA adapter disabled (the start model is the reference)."""
        rows = 2 * inputs["image_tokens"].shape[0] // 3
        head = {k: v[:rows] for k, v in inputs.items()}
        with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
            per_token = self.concatenated_forward(model, head)
        return tuple(self._sequence_logps(per_token, head).chunk(2))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        per_token = self.concatenated_forward(model, inputs)  # (3B, N)
        chosen, rejected, swapped = self._sequence_logps(per_token, inputs).chunk(3)  # (B,) each
        reference = self.compute_ref_log_probs(model, inputs) if self.args.objective.loss == "dpo" else None
        batch = chosen.shape[0]
        loss, metrics = ospo_loss(chosen, rejected, swapped, per_token[:batch], torch.ones_like(per_token[:batch]),
                                  self.args.objective, reference_logps=reference)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite OSPO loss ({loss.item()}) at step {self.state.global_step}: training stopped; the last "
                f"checkpoint in {self.args.output_dir} is kept. Lower the learning rate or check the pairs table."
            )
        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather(value.detach()).float().mean().item())
        return (loss, {"per_token_logps": per_token.detach()}) if return_outputs else loss

    # The Trainer saves neither the loss total behind `train_loss` nor the loss and TRL metrics of the steps since the
    # last log, and resets them when it resumes; a resumed run would average only its own steps. They travel in the
    # checkpoint instead. Every process calls _save_checkpoint, so the gather below is a matched collective.
    def _save_checkpoint(self, model, trial):
        pending = self.accelerator.gather(self._tr_loss.detach().reshape(1)).mean().item()  # logs average processes
        self.record.carry = {"total_loss": self._total_loss_scalar, "pending_loss": pending,
                             "last_logged_step": self._globalstep_last_logged,
                             "pending_metrics": {k: list(v) for k, v in self._metrics["train"].items()}}
        super()._save_checkpoint(model, trial)

    def _restore_carry(self, carry: dict) -> None:
        self._total_loss_scalar = carry["total_loss"]
        self._tr_loss += carry["pending_loss"]
        self._globalstep_last_logged = carry["last_logged_step"]
        for key, values in carry["pending_metrics"].items():
            self._metrics["train"][key][:0] = values

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs:  # the Trainer divides by this call's steps; the run's mean covers all of them
            logs["train_loss"] = self._total_loss_scalar / max(self.state.global_step, 1)
        super().log(logs, start_time)


@dataclass
class TrainResult:
    adapter_dir: Path
    history: pa.Table  # records.TRAIN_HISTORY: (step, metric, value)
    final_metrics: dict[str, float]
    steps: int


def lora_config(cfg: TrainConfig) -> LoraConfig:
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=LORA_TARGET_REGEX)


# FSDP gives every module the trainer calls outside the language model's forward (text and image-token embeddings,
# image aligner, generation head) its own shard group, so that each gathers its weights when called.
FSDP_WRAP = ["LlamaDecoderLayer", "Embedding", "JanusVQVAEAlignerMLP", "JanusVQVAEHead"]


def ospo_training_args(cfg: TrainConfig, output_dir: Path, device: torch.device,
                       data_parallel: Literal["ddp", "fsdp"] = "ddp", validate: bool = False) -> OSPOConfig:
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    cosine = cfg.lr_scheduler == "cosine"
    return OSPOConfig(
        output_dir=str(output_dir),
        objective=cfg,
        learning_rate=cfg.learning_rate, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_epsilon=1e-8,
        weight_decay=0.0,
        lr_scheduler_type="cosine_with_min_lr" if cosine else "constant",
        lr_scheduler_kwargs={"min_lr": cfg.min_lr} if cosine else None,
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps) if cosine else 0,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.accumulation(int(os.environ.get("WORLD_SIZE", "1"))),
        eval_strategy="steps" if validate else "no", eval_steps=cfg.eval_steps,
        per_device_eval_batch_size=cfg.batch_size,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=bf16, fp16=False,
        seed=cfg.seed, data_seed=cfg.seed,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        logging_steps=cfg.logging_steps, logging_first_step=True,
        report_to="none",
        disable_tqdm=True,  # progress is reported by the caller's callbacks (Prefect artifacts, logs)
        remove_unused_columns=False,  # our columns are not model forward arguments
        disable_dropout=False,  # keep the paper's LoRA dropout
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        ddp_find_unused_parameters=False,  # every LoRA weight is in the language model, used by every forward
        fsdp="full_shard auto_wrap" if data_parallel == "fsdp" else None,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": FSDP_WRAP} if data_parallel == "fsdp" else None,
    )


def checkpoint_record(checkpoint: Path) -> dict | None:
    """The RunRecord a checkpoint folder holds ({"run_key": ...}; {} when it has none), or None when a crash left it
    half-written (the Trainer writes trainer_state.json last)."""
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return (state.get("stateful_callbacks") or {}).get(RunRecord.__name__, {}).get("args", {})


def claim_checkpoints(output_dir: Path, run_key: str | None, resume: bool) -> None:
    """Leave in `output_dir` only the checkpoints this run may resume: complete ones recorded with its key (when
    `resume`). Half-written ones are removed; those of another run (other settings or pairs: another key, or no
    record) are moved to `superseded/`, kept until this run's adapter is saved. Run it in one process only."""
    for path in Path(output_dir).glob("checkpoint-*"):
        record = checkpoint_record(path)
        if record is None:
            shutil.rmtree(path)
        elif not (resume and "run_key" in record and record["run_key"] == run_key):
            aside = Path(output_dir) / SUPERSEDED / path.name
            shutil.rmtree(aside, ignore_errors=True)  # an even older run's checkpoint of the same step
            aside.parent.mkdir(exist_ok=True)
            path.rename(aside)
            logger.info("%s (run %s) is not resumed by run %s: moved to %s", path.name,
                        record.get("run_key", "unrecorded"), run_key, aside)


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint in `output_dir` (after claim_checkpoints: the one to resume from), or None."""
    found = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def split_validation(item_ids: list[str], fraction: float, seed: int) -> list[bool]:
    """Which pairs are held out for validation: those whose stable hash of (seed, item_id) falls below `fraction`;
    with fraction > 0 and at least 2 pairs, at least one is held out and at least one trains."""
    if fraction <= 0 or len(item_ids) < 2:
        return [False] * len(item_ids)
    u = [int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:12], 16) / 16**12 for i in item_ids]
    held = [x < fraction for x in u]
    if not any(held):
        held[min(range(len(u)), key=u.__getitem__)] = True
    if all(held):
        held[max(range(len(u)), key=u.__getitem__)] = False
    return held


def train_ospo(
    pairs: pa.Table,
    bundle: JanusBundle,
    cfg: TrainConfig,
    output_dir: str | Path,
    *,
    masks: pa.Table | None = None,
    callbacks: list[TrainerCallback] | None = None,
    resume: bool = True,
    run_key: str | None = None,
    data_parallel: Literal["ddp", "fsdp"] = "ddp",
) -> TrainResult:
    """Train a LoRA adapter on the pairs; writes `<output_dir>/adapter` (safetensors + the base fingerprint).

    Takes ownership of `bundle.model` (LoRA layers are injected into it). With `resume`, an interrupted run
    continues from its last checkpoint in `output_dir`, but only from one written under the same `run_key` (the
    stage's cache key: settings, pairs and model); any other checkpoint is moved aside and training starts fresh.
    """
    output_dir = Path(output_dir)
    dataset = pairs_to_dataset(pairs, bundle, cfg, masks)
    held = split_validation(dataset["item_id"], cfg.validation_fraction, cfg.seed)
    validation = dataset.select([i for i, h in enumerate(held) if h]) if any(held) else None
    dataset = dataset.select([i for i, h in enumerate(held) if not h]) if any(held) else dataset
    counts = {"pairs/train": len(dataset), "pairs/validation": len(validation) if validation is not None else 0,
              "pairs/skipped_no_mask": skipped_without_masks(pairs, masks) if cfg.object_weighting else 0}
    logger.info("training on %d pairs, validating on %d, %d skipped without object masks", *counts.values())
    args = ospo_training_args(cfg, output_dir, bundle.device, data_parallel, validate=validation is not None)
    if args.bf16 is False and bundle.dtype != torch.float32:
        bundle.model.float()  # fp32 training on CPU: bf16 weights would train with bf16 rounding
    trainer = OSPOTrainer(bundle.model, args, dataset, bundle.processor, peft_config=lora_config(cfg),
                          run_key=run_key, callbacks=callbacks, eval_dataset=validation)
    trainer.remove_callback(PrinterCallback)  # metrics go to the history table, not to stdout
    if trainer.accelerator.is_main_process:
        claim_checkpoints(output_dir, run_key, resume)
    trainer.accelerator.wait_for_everyone()
    trainer.train(resume_from_checkpoint=last_checkpoint(output_dir))
    if validation is not None and trainer.state.global_step % cfg.eval_steps:
        trainer.evaluate()  # the final model's validation, when the last step was not a validation step
    # Written beside its final name and renamed, so a crash never leaves a half-written adapter behind.
    adapter_dir, staging = output_dir / "adapter", output_dir / ".adapter.tmp"
    # Under data parallelism every process runs this: all take part in gathering the weights (FSDP shards them),
    # the main process alone writes.
    state = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(staging, state_dict=state,
                                                                        safe_serialization=True)
        write_adapter_meta(staging, bundle.fingerprint, loss=cfg.loss, steps=trainer.state.global_step)
        shutil.rmtree(adapter_dir, ignore_errors=True)
        staging.rename(adapter_dir)
        shutil.rmtree(output_dir / SUPERSEDED, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    # Keys sorted within each log entry: a resumed run's earlier entries come back from JSON with sorted keys.
    history = [{"step": 0, "metric": key, "value": float(value)} for key, value in counts.items()] + [
        {"step": int(entry["step"]), "metric": key, "value": float(value)}
        for entry in trainer.state.log_history
        for key, value in sorted(entry.items())
        if key not in ("step", "epoch") and isinstance(value, (int, float))
    ]
    final = {r["metric"]: r["value"] for r in history}
    return TrainResult(adapter_dir, pa.Table.from_pylist(history, schema=TRAIN_HISTORY), final,
                       trainer.state.global_step)
