"""Batched text generation: left padding, a KV cache, per-row seeds and per-row early stop."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ospo_core.janus.chat import render_chat
from ospo_core.janus.load import JanusBundle
from ospo_core.janus.sampling import as_seeds, row_uniforms, sample_tokens


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, so left padding does not shift a prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


@torch.no_grad()
def generate_text(
    bundle: JanusBundle,
    chats: list[list[dict]],
    *,
    seed: int | list[int] = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    greedy: bool = False,
) -> list[str]:
    """Each chat (system/user/assistant messages, ending with a user turn) -> the decoded new text.

    Special tokens are skipped in the decoded text. Row b samples from its own generator seeded by seed[b], so a
    chat's answer does not depend on the other chats of its batch.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")
    seeds = as_seeds(seed, len(chats))
    texts = [render_chat(bundle.processor, chat) for chat in chats]
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        out += _generate_batch(
            bundle, texts[start : start + batch_size], seeds[start : start + batch_size],
            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, greedy=greedy,
        )
    return out


def _generate_batch(bundle, texts, seeds, *, temperature, top_p, max_new_tokens, greedy) -> list[str]:
    tok, model, device = bundle.tokenizer, bundle.model, bundle.device
    enc = tok(texts, padding=True, padding_side="left", return_tensors="pt").to(device)
    t = enc["input_ids"].shape[1]
    # Mask and positions for prompt + every new token, made once: the cache only ever reads its first columns
    # (the attention mask may be longer than the keys), so no step concatenates or reallocates them.
    mask = torch.ones(len(texts), t + max_new_tokens, dtype=torch.bool, device=device)  # (B, T + max_new)
    mask[:, :t] = enc["attention_mask"].bool()
    positions = positions_from_mask(mask)  # (B, T + max_new)
    uniforms = row_uniforms(seeds, max_new_tokens, device) if not greedy else None  # (B, max_new)
    cache = DynamicCache(config=model.config.text_config)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    batch = len(texts)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = []
    inputs = enc["input_ids"]
    for step in range(max_new_tokens):
        cols = slice(0, t) if step == 0 else slice(t + step - 1, t + step)  # the prompt, then one new token
        out = model(input_ids=inputs, attention_mask=mask[:, : cols.stop], position_ids=positions[:, cols],
                    cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]  # (B, V)
        u = uniforms[:, step] if uniforms is not None else None
        nxt = sample_tokens(logits, u, temperature=temperature, top_p=top_p, greedy=greedy)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)  # finished rows only carry padding
        new_tokens.append(nxt)
        finished |= nxt == eos
        if bool(finished.all()):
            break
        inputs = nxt.unsqueeze(-1)  # (B, 1)
    generated = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
    texts_out = []
    for row in generated:
        if eos in row:
            row = row[: row.index(eos)]
        texts_out.append(tok.decode(row, skip_special_tokens=True))
    return texts_out
