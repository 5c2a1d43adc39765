"""Judge weights from local folders in transformers format: safetensors only, no remote code, no download."""

from __future__ import annotations

import hashlib
import logging
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("ospo.judges")


def judge_folder(root: str | None, part: str, judge: str) -> Path:
    """`<root>/<part>`, or one clear error naming what the judge needs."""
    if not root:
        raise ValueError(f"the {judge} judge loads its models from a local folder: set judge_model (--judge-model "
                         f"DIR) to a folder holding {part}/ in transformers format")
    folder = Path(root) / part
    if not (folder / "config.json").is_file():
        raise ValueError(f"judge_model {root}: no {part}/config.json; the {judge} judge needs {part}/ (a "
                         f"transformers-format folder: config.json, *.safetensors, tokenizer/processor files)")
    return folder


def folder_identity(root: str) -> str:
    """A cheap identity of a folder's weights for cache keys: every file's relative path, size and mtime."""
    h = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            stat = path.stat()
            h.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def from_folder(cls, folder: Path):
    """`cls.from_pretrained` on a local folder, never running a checkpoint's code nor unpickling weights."""
    return cls.from_pretrained(folder, trust_remote_code=False, use_safetensors=True, local_files_only=True)


@cache
def load_clip(folder: str):
    """(model, tokenizer, image processor) of a CLIP folder, on the default device, in eval mode (once per process)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = Path(folder)
    model = from_folder(CLIPModel, path).to(device()).eval()
    return model, from_folder(AutoTokenizer, path), from_folder(AutoImageProcessor, path)


def _features(output) -> torch.Tensor:
    # transformers 5 returns the projected embeddings as the output's pooler_output
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_image_features(clip, images: list) -> torch.Tensor:
    """Unit-norm CLIP image embeddings, (B, D)."""
    model, _, processor = clip
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    features = _features(model.get_image_features(pixel_values=pixels)).float()
    return features / features.norm(dim=-1, keepdim=True)


@torch.no_grad()
def clip_text_features(clip, texts: list[str]) -> torch.Tensor:
    """Unit-norm CLIP text embeddings, (B, D); texts are cut to the model's context length."""
    model, tokenizer, _ = clip
    limit = model.config.text_config.max_position_embeddings
    enc = tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt").to(model.device)
    features = _features(model.get_text_features(**enc)).float()
    return features / features.norm(dim=-1, keepdim=True)
