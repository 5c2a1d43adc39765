"""Scoring with the model itself: yes/no self-VQA, image-token log-likelihoods, VQ re-encoding."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from PIL import Image

from ospo_core.janus.chat import render_chat, understanding_chat
from ospo_core.janus.image import gen_prompt_batch
from ospo_core.janus.load import JanusBundle
from ospo_core.janus.memory import kv_bytes_per_position, resolve_batch


def as_rgb(images: list, what: str = "image") -> list[Image.Image]:
    """Accept PIL images of any size and mode (converted to RGB; the processor resizes); refuse anything else."""
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"{what} {i} is a {type(image).__name__}, not a PIL image; decode it first")
        out.append(image if image.mode == "RGB" else image.convert("RGB"))
    return out


def yes_no_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of "yes"/"Yes" and "no"/"No": the last token of each word (resolved per tokenizer)."""
    last = lambda w: tokenizer(w, add_special_tokens=False)["input_ids"][-1]  # noqa: E731
    return [last("yes"), last("Yes")], [last("no"), last("No")]


@torch.no_grad()
def score_yes_no(
    bundle: JanusBundle,
    images: list[Image.Image],
    questions: list[list[str]],
    *,
    shared_prefix: bool = True,
    batch_size: int | str = 8,
) -> list[list[tuple[float, float]]]:
    """For each image, (p_yes, p_no) per question from the next-token distribution of the understanding chat.

    p_yes = max(P[yes], P[Yes]), p_no = max(P[no], P[No]) under the full-vocabulary softmax. With `shared_prefix`
    the part of the prompt shared by an image's questions (system prompt + image) is run once, and its questions
    are packed into that image's one cache row behind it (each attending the prefix and itself only); the result
    equals one full forward per question, and no cache row is copied per question. `batch_size`: images per batch,
    or "auto" (by free memory on a GPU, see `ospo_core.janus.memory`).
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} question lists; pass one list per image")
    for i, qs in enumerate(questions):
        if any(not q.strip() for q in qs):
            raise ValueError(f"question list {i} holds an empty question; drop empty questions before scoring")
    images = as_rgb(images)
    # "auto": by free memory, an image's cache row over its prefix (~image tokens + system prompt) and questions
    per_image = kv_bytes_per_position(bundle.model) * (bundle.num_image_tokens + 64 + 32 * max(map(len, questions),
                                                                                             default=1))
    batch_size = resolve_batch(batch_size, "vqa", bundle.device, per_image, limit=max(len(images), 1))
    yes, no = yes_no_ids(bundle.tokenizer)
    results: list[list[tuple[float, float]]] = []
    for start in range(0, len(images), batch_size):
        imgs, qss = images[start : start + batch_size], questions[start : start + batch_size]
        score = _score_shared if shared_prefix else _score_full
        results += score(bundle, imgs, qss, yes, no)
    return results


def _yes_no(probs: torch.Tensor, yes: list[int], no: list[int]) -> list[tuple[float, float]]:
    p_yes = probs[:, yes].max(-1).values.tolist()
    p_no = probs[:, no].max(-1).values.tolist()
    return list(zip(p_yes, p_no))


def _encode(bundle, image, qs):
    texts = [render_chat(bundle.processor, understanding_chat(q)) for q in qs]
    return bundle.processor(text=texts, images=[image] * len(qs), padding=True, return_tensors="pt")


def _score_full(bundle, images, questions, yes, no):
    """Reference path: one full forward (image encoder included) per question."""
    out = []
    for image, qs in zip(images, questions):
        rows = []
        for q in qs:
            enc = _encode(bundle, image, [q]).to(bundle.device)
            logits = bundle.model(**enc, logits_to_keep=1).logits[:, -1].float()
            rows += _yes_no(torch.softmax(logits, -1), yes, no)
        out.append(rows)
    return out


def _score_shared(bundle, images, questions, yes, no):
    model, device = bundle.model, bundle.device
    # Tokenise every (image, question) prompt in full, exactly as the reference path does.
    ids = [[_encode(bundle, img, [q])["input_ids"][0] for q in qs] for img, qs in zip(images, questions)]
    flat = [t for row in ids for t in row]
    if not flat:
        return [[] for _ in images]
    # The shared prefix: tokens common to every prompt of the batch (system + image), leaving >= 1 token each.
    prefix_len = min(len(t) for t in flat) - 1
    first = flat[0]
    for t in flat[1:]:
        neq = (t[:prefix_len] != first[:prefix_len]).nonzero()
        if len(neq):
            prefix_len = int(neq[0])
    has_q = [i for i, qs in enumerate(questions) if qs]
    pixel_values = bundle.processor.image_processor([images[i] for i in has_q], return_tensors="pt")["pixel_values"]
    prefix = first[:prefix_len].unsqueeze(0).expand(len(has_q), -1).to(device)  # (I, P)
    cache = model.model(input_ids=prefix, pixel_values=pixel_values.to(device, bundle.dtype), use_cache=True).cache
    # Each image's questions are packed into one row after its prefix: question j's tokens take positions P, P+1,
    # ... (as in its own full prompt) and attend the prefix and their own question only (a block-diagonal mask).
    # So one cache row per image serves all its questions: nothing is copied per question.
    suffixes = [[t[prefix_len:] for t in ids[i]] for i in has_q]
    width = max(sum(len(s) for s in row) for row in suffixes)
    packed = torch.full((len(has_q), width), bundle.tokenizer.pad_token_id, dtype=torch.long)  # (I, W)
    positions = torch.full((len(has_q), width), prefix_len, dtype=torch.long)  # (I, W)
    block = torch.full((len(has_q), width), -1, dtype=torch.long)  # (I, W) question index, -1 = padding
    last = []  # (row, column) of each question's last token, in question order
    for r, row in enumerate(suffixes):
        col = 0
        for j, sfx in enumerate(row):
            packed[r, col : col + len(sfx)] = sfx
            positions[r, col : col + len(sfx)] += torch.arange(len(sfx))
            block[r, col : col + len(sfx)] = j
            col += len(sfx)
            last.append((r, col - 1))
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (W, W)
    own = (block[:, :, None] == block[:, None, :]) & causal  # (I, W, W): same question, not later
    mask = torch.cat([torch.ones(len(has_q), width, prefix_len, dtype=torch.bool), own], dim=-1)[:, None]
    hidden = model.model(input_ids=packed.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), cache=cache, use_cache=True).last_hidden_state  # (I, W, D)
    rows, cols = zip(*last)
    probs = torch.softmax(model.lm_head(hidden[list(rows), list(cols)]).float(), -1)  # (Q, V), last tokens only
    scores = iter(_yes_no(probs, yes, no))
    return [[next(scores) for _ in qs] for qs in questions]


# Positions per piece of the generation head's log-softmax: (2048, 16384) fp32 logits = 128 MiB at a time.
HEAD_CHUNK = 2048


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  chunk: int | None = HEAD_CHUNK) -> torch.Tensor:
    """log softmax(head(hidden))[targets], (B, N) fp32, computed `chunk` positions at a time.

    The whole (B, N, V) fp32 logits, their log-softmax and both gradients (4 x 0.9 GiB for 24 rows x 576 tokens x
    16,384 codes) are never held at once: each piece's logits give gather - logsumexp and are dropped; in training
    each piece is recomputed in the backward pass (activation checkpointing of the head alone), so the head's
    memory is one piece's whatever the batch. chunk=None: one piece (the plain log_softmax + gather).
    """
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (B*N, D), (B*N,)
    if chunk is None or flat_t.numel() <= chunk:
        return _piece_logprobs(head, flat_h, flat_t).view(targets.shape)
    grad = torch.is_grad_enabled() and flat_h.requires_grad
    pieces = [
        torch.utils.checkpoint.checkpoint(_piece_logprobs, head, h, t, use_reentrant=False) if grad
        else _piece_logprobs(head, h, t)
        for h, t in zip(flat_h.split(chunk), flat_t.split(chunk))
    ]
    return torch.cat(pieces).view(targets.shape)


def _piece_logprobs(head, hidden, targets):
    logits = head(hidden).float()  # (C, V) fp32
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)  # (C,)


def image_token_logps(
    model,
    prompt_ids: torch.Tensor,  # (B, T) left-padded gen-prompt ids, ending in <begin_of_image>
    prompt_mask: torch.Tensor,  # (B, T)
    image_tokens: torch.Tensor,  # (B, N)
    *,
    trunk: torch.nn.Module | None = None,
    head_chunk: int | None = HEAD_CHUNK,
) -> torch.Tensor:
    """log p(y_t | x, y_<t) under the generation head for every image token, (B, N) fp32. Keeps the graph.

    The sequence is [text embeds of x] ++ [gen_aligner(gen_embed(y))]; position T-1 (<begin_of_image>) predicts y_1
    and the last image position is unused, so the head runs on exactly N positions.

    `trunk`: in training, the model as the trainer wrapped it (PEFT, then DDP/FSDP). The language model then runs
    through the wrapper's own forward, which is where DDP prepares the gradient all-reduce of the backward pass (a
    call into a submodule would train every process on its own gradients) and FSDP gathers its shards. The full
    model's forward gives the final-norm output of the language model as its last hidden state (transformers 5.24),
    the input of the generation head. Without `trunk` (scoring) the language model is called directly, which keeps
    no per-layer hidden states. `head_chunk`: see `head_logprobs`.
    """
    n = image_tokens.shape[1]
    text = model.get_input_embeddings()(prompt_ids)  # (B, T, D)
    img = model.prepare_embeddings_for_image_generation(image_tokens)  # (B, N, D)
    embeds = torch.cat([text, img.to(text.dtype)], dim=1)  # (B, T+N, D)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(image_tokens.shape)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    if trunk is None:
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                            use_cache=False).last_hidden_state  # (B, T+N, D)
    else:
        hidden = trunk(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                       output_hidden_states=True, logits_to_keep=1).hidden_states[-1]  # (B, T+N, D), after the norm
    t = prompt_ids.shape[1]
    return head_logprobs(model.model.generation_head, hidden[:, t - 1 : t - 1 + n], image_tokens, head_chunk)


def check_image_tokens(bundle: JanusBundle, image_tokens: torch.Tensor) -> torch.Tensor:
    tokens = torch.as_tensor(image_tokens, dtype=torch.long)
    if tokens.ndim != 2 or tokens.shape[1] != bundle.num_image_tokens:
        raise ValueError(
            f"image tokens must have shape (B, {bundle.num_image_tokens}) for this model, got {tuple(tokens.shape)}"
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= bundle.codebook_size):
        raise ValueError(
            f"image token ids must lie in [0, {bundle.codebook_size}) (the model's codebook); got "
            f"[{int(tokens.min())}, {int(tokens.max())}] — were these tokens made by another model?"
        )
    return tokens


@torch.no_grad()
def image_logprobs(
    bundle: JanusBundle,
    prompts: list[str],
    image_tokens: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per_token [B, N], mean [B]): log-probs of the given image tokens under each short prompt's gen prompt.

    `mean` is the length-normalised image log-likelihood l(x, y) of the method (weighted by `weights` [B, N] when
    given: sum(w * logp) / sum(w)).
    """
    tokens = check_image_tokens(bundle, image_tokens)
    if len(prompts) != len(tokens):
        raise ValueError(f"got {len(prompts)} prompts for {len(tokens)} token rows")
    per_token = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = gen_prompt_batch(bundle, prompts[start : start + batch_size])
        per_token.append(image_token_logps(bundle.model, ids, mask, tokens[start : start + batch_size].to(bundle.device)))
    per_token = torch.cat(per_token).cpu()  # (B, N)
    w = torch.ones_like(per_token) if weights is None else torch.as_tensor(weights, dtype=per_token.dtype)
    mean = (per_token * w).sum(-1) / w.sum(-1)
    return per_token, mean


@torch.no_grad()
def encode_images(bundle: JanusBundle, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> VQ token ids (B, N), raster order (the authors' re-encoding of generated PNGs)."""
    images = as_rgb(images)
    pixel_values = bundle.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    out = bundle.model.model.vqmodel.encode(pixel_values.to(bundle.device, bundle.dtype))
    return out.image_tokens.view(len(images), -1).cpu()
