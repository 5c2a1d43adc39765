"""Load a Janus model: the built-in tiny one or a local transformers-format checkpoint, plus LoRA adapters.

The one loader of the project. Nothing is downloaded (`local_files_only`), weights load from safetensors only and
no code from a checkpoint folder runs: every `from_pretrained` passes `trust_remote_code=False`, so an `auto_map`
in the folder's JSON is never imported and transformers never asks "Do you wish to run the custom code?". Only
regular files are read: a weights file that is a fifo or a link to a device (which would block or never end) is
refused. Adapters are applied in order and merged, so round N+1 starts from base + adapters of rounds
1..N; each adapter records the fingerprint of the model it was trained from, and applying it to another model is
refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

from ospo_core.janus.chat import BEGIN_OF_IMAGE, CHAT_TEMPLATE
from ospo_core.janus.tiny import build_tiny_janus

log = logging.getLogger("ospo.load")

# Written beside every adapter we save: which model it was trained from.
ADAPTER_META = "ospo_adapter.json"
# LoRA goes into the language model only: SigLIP also has q_proj/k_proj/... modules.
LORA_TARGET_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class ModelLoadError(ValueError):
    """A model folder or adapter that cannot be used; the message says what is wrong and how to fix it."""


@dataclass
class JanusBundle:
    model: JanusForConditionalGeneration
    processor: JanusProcessor
    fingerprint: str  # changes when the base weights or any applied adapter changes
    source: str  # "tiny" or the checkpoint folder
    adapters: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_image_tokens(self) -> int:
        return self.model.config.vision_config.num_image_tokens

    @property
    def grid(self) -> int:
        return int(round(self.num_image_tokens**0.5))

    @property
    def codebook_size(self) -> int:
        return self.model.config.vq_config.num_embeddings

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls are slow and lossy on CPU)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_janus(
    source: str | os.PathLike = "tiny",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    adapters: tuple | list = (),
    seed: int = 0,
) -> JanusBundle:
    """`source` is "tiny" (built-in random model, `seed` picks its weights) or a local Janus checkpoint folder."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if str(source) == "tiny":
        model, processor = build_tiny_janus(seed)
        fingerprint = _hash_state_dict(model)
        source = "tiny"
    else:
        folder = Path(source)
        model, processor = _load_folder(folder, dtype)
        fingerprint = _hash_folder(folder)
        source = str(folder)
    _ensure_generation_config(model, processor)
    model.to(device=device, dtype=dtype).eval()
    bundle = JanusBundle(model=model, processor=processor, fingerprint=fingerprint, source=source)
    for adapter in adapters:
        bundle = apply_adapter(bundle, adapter)
    return bundle


def check_model_source(source: str | os.PathLike) -> None:
    """Refuse a model source that cannot load, without loading any weights (a CLI checks this before it writes)."""
    if str(source) != "tiny":
        _check_folder(Path(source))


def _check_regular_files(folder: Path) -> None:
    """Refuse a folder holding anything but regular files and folders (after links): a fifo or a device such as
    /dev/zero under a weights or tokenizer name would block the loader or feed it without end."""
    for path in sorted(folder.iterdir()):
        if not (path.is_file() or path.is_dir()):
            raise ModelLoadError(
                f"{path} is not a regular file (a device, fifo, socket or broken link); only regular files are "
                f"loaded: replace it with the real file or remove it from {folder}"
            )


def _auto_map_files(folder: Path) -> list[str]:
    """The folder's JSON files that name custom code (`auto_map`), which is never run."""
    named = []
    for path in sorted(folder.glob("*.json")):
        try:
            document = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # the loader itself reports a damaged file
        if isinstance(document, dict) and "auto_map" in document:
            named.append(path.name)
    return named


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelLoadError(
            f"model folder {folder} does not exist; pass --model tiny or a local folder holding a "
            "transformers-format Janus checkpoint (config.json, *.safetensors, tokenizer files)"
        )
    _check_regular_files(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} is not a model checkpoint: it has no config.json")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON ({exc}); the checkpoint folder is corrupt") from exc
    if model_type != "janus":
        raise ModelLoadError(
            f"{folder} holds a {model_type!r} checkpoint, not a Janus one (config.json model_type must be 'janus'); "
            "convert the original Janus-Pro weights to the transformers format first"
        )
    if not list(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{folder} has no *.safetensors weights; only safetensors are loaded (pickled .bin files are refused)"
        )


def _load_folder(folder: Path, dtype: torch.dtype):
    _check_folder(folder)
    custom_code = _auto_map_files(folder)
    try:
        model = JanusForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, padding_side="left", trust_remote_code=False
        )
        image_processor = JanusImageProcessorPil.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        if custom_code:
            raise ModelLoadError(
                f"could not load the Janus checkpoint in {folder} without running its own code: "
                f"{', '.join(custom_code)} name custom classes ('auto_map'), which are never run; use a "
                "transformers-native Janus checkpoint (remove 'auto_map' and name a transformers class)"
            ) from exc
        reason = " ".join(str(exc).split())  # transformers' messages span lines; ours is one
        raise ModelLoadError(f"could not load the Janus checkpoint in {folder}: {reason}") from exc
    if custom_code:
        log.warning("%s: ignored 'auto_map' in %s; the folder's own code is never run, transformers' Janus classes "
                    "were used", folder, ", ".join(custom_code))
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,  # ours, whatever the folder ships: one template everywhere
        num_image_tokens=model.config.vision_config.num_image_tokens,
    )
    return model, processor


def _ensure_generation_config(model, processor) -> None:
    """transformers' image generate needs boi_token_id in generation_kwargs; real checkpoints may lack it."""
    tok = processor.tokenizer
    gc = model.generation_config
    gc.generation_kwargs = {**(getattr(gc, "generation_kwargs", None) or {}), "boi_token_id": tok.convert_tokens_to_ids(BEGIN_OF_IMAGE)}
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id


def save_janus(bundle: JanusBundle, folder: str | os.PathLike) -> Path:
    """Save model + processor as a checkpoint folder that `load_janus(folder)` loads (safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(folder, safe_serialization=True)
    bundle.processor.save_pretrained(folder)
    return folder


def apply_adapter(bundle: JanusBundle, adapter: str | os.PathLike) -> JanusBundle:
    """Merge one saved LoRA adapter into the bundle's model; refuse an adapter trained from another model."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise ModelLoadError(
            f"{adapter} is not a LoRA adapter folder (needs adapter_config.json and adapter_model.safetensors as "
            "regular files)"
        )
    _check_regular_files(adapter)
    meta_path = adapter / ADAPTER_META
    if meta_path.is_file():
        try:
            base = json.loads(meta_path.read_bytes()).get("base_fingerprint")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelLoadError(
                f"{meta_path} is not a JSON object ({exc}); restore it or retrain the adapter"
            ) from exc
        if base != bundle.fingerprint:
            raise ModelLoadError(
                f"adapter {adapter} was trained from model {base}, but it is being applied to model "
                f"{bundle.fingerprint} ({bundle.source} + {len(bundle.adapters)} adapters); load the base model "
                "and the earlier rounds' adapters it was trained on, in order"
            )
    try:
        peft_model = PeftModel.from_pretrained(bundle.model, adapter, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"adapter {adapter} does not fit this model ({bundle.source}): {exc}") from exc
    model = peft_model.merge_and_unload()
    model.eval()
    fingerprint = merged_fingerprint(bundle.fingerprint, adapter)
    return JanusBundle(model, bundle.processor, fingerprint, bundle.source, bundle.adapters + (str(adapter),))


def merged_fingerprint(base_fingerprint: str, adapter: str | os.PathLike) -> str:
    """Fingerprint of a model after merging `adapter` (computable without loading either)."""
    weights = _hash_file(Path(adapter) / "adapter_model.safetensors")
    return hashlib.sha256((base_fingerprint + weights).encode()).hexdigest()[:16]


def write_adapter_meta(adapter_dir: str | os.PathLike, base_fingerprint: str, **extra) -> None:
    Path(adapter_dir, ADAPTER_META).write_text(json.dumps({"base_fingerprint": base_fingerprint, **extra}, indent=2))


def _hash_state_dict(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


_FILE_HASHES: dict[tuple, str] = {}


def _hash_file(path: Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so a 14 GB checkpoint is read once per process."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):  # /dev/zero never ends, a fifo blocks
        raise ModelLoadError(f"{path} is not a regular file (a device, fifo or socket); only regular files are read")
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def _hash_folder(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted([folder / "config.json", *folder.glob("*.safetensors")]):
        h.update(path.name.encode())
        h.update(_hash_file(path).encode())
    return h.hexdigest()[:16]
