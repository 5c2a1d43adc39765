"""Text generation at the hardware's pace: shared few-shot prefixes, a static slot cache, continuous batching.

A text stage sends thousands of chats that differ only in their last user turn: the system prompt and the few-shot
turns (hundreds of tokens) are the same for every chat of a template family. So:

- **Prefix once per family.** Chats are grouped by everything but their last message; the tokens the group's
  prompts share (their longest common token prefix, so it is exact: the same tokens a full prompt would feed) run
  through the model once, and their keys and values are copied into the cache row of every chat of the family.
  Only each chat's own suffix is prefilled.
- **Static slot cache.** One preallocated KV buffer of `batch` rows (slots); every row writes at its own positions
  (chats have different lengths) and attends through an explicit mask `key position <= query position`, so no
  padding enters a row and a row's numbers do not depend on its neighbours' lengths.
- **Continuous batching.** A row that ends (EOS or its token budget) frees its slot; waiting chats are admitted
  into free slots (their suffixes prefilled together), so the batch never idles on its longest answer. Active rows
  are kept packed at the front of the buffer, and an eager step runs only those.
- **The per-token step** can be compiled like the image sampler's (`compile_mode="auto"`: CUDA graphs on a GPU,
  eager on a CPU); a compiled step always runs every slot (one shape per KV block).

Sampling is per chat, as before: chat i draws its t-th token with the t-th uniform of its own seed, so an answer
does not depend on the batch, the batch size, the other chats or the order they are admitted in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer

from ospo_core.janus.chat import render_chat
from ospo_core.janus.load import JanusBundle
from ospo_core.janus.memory import kv_bytes_per_position, resolve_batch, round_up
from ospo_core.janus.sampling import as_seeds, row_uniforms, sample_tokens

COMPILE_MODES = (None, "eager", "auto", "default", "reduce-overhead", "max-autotune")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, so left padding does not shift a prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def resolve_compile_mode(compile_mode: str | None, device: torch.device) -> str | None:
    """A torch.compile mode, or None for eager; "auto" = CUDA graphs on a GPU (launch-bound steps), eager on a CPU."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES[1:]} or None (eager), got {compile_mode!r}")
    if compile_mode == "auto":  # the step is launch-bound on a GPU: CUDA graphs 2.2-4.3x (bench/RESULTS.md)
        return "reduce-overhead" if device.type == "cuda" else None
    return None if compile_mode == "eager" else compile_mode


class _SlotLayer(StaticLayer):
    """One layer of a `SlotCache`: preallocated (slots, H, L, d) keys and values, rows written at their own
    positions, attention reading the owner's current rows up to its current span."""

    def __init__(self, owner: SlotCache, max_cache_len: int):
        super().__init__(max_cache_len)
        self.owner = owner

    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        keys, values = self.keys[o.lo : o.hi], self.values[o.lo : o.hi]  # views, (b, H, L, d)
        rows = o.row_index[: o.hi - o.lo]  # (b, 1)
        keys[rows, :, o.pos] = key_states.transpose(1, 2)  # (b, q, H, d) at each row's own positions
        values[rows, :, o.pos] = value_states.transpose(1, 2)
        return keys[:, :, : o.span], values[:, :, : o.span]


class SlotCache(Cache):
    """A static KV cache of `slots` rows in which every row has its own length.

    Before each forward the caller sets which rows run (`lo:hi`, a contiguous range), where each writes (`pos`,
    (b, q) positions) and how many positions attention reads (`span`, rounded up to whole KV blocks so a compiled
    step sees one shape per block). Positions past a row's length hold stale values that the mask never shows.
    """

    def __init__(self, model, slots: int, max_cache_len: int):
        cfg = model.config.text_config
        super().__init__(layers=[_SlotLayer(self, max_cache_len) for _ in range(cfg.num_hidden_layers)])
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        probe = torch.empty(slots, cfg.num_key_value_heads, 1, head_dim, dtype=param.dtype, device=param.device)
        for layer in self.layers:
            layer.lazy_initialization(probe, probe)
        self.slots, self.max_cache_len = slots, max_cache_len
        self.row_index = torch.arange(slots, device=param.device).unsqueeze(-1)  # (slots, 1)
        self.lo, self.hi, self.span = 0, slots, max_cache_len
        self.pos = torch.zeros(slots, 1, dtype=torch.long, device=param.device)

    def set_rows(self, lo: int, hi: int, pos: torch.Tensor, span: int) -> None:
        self.lo, self.hi, self.pos, self.span = lo, hi, pos, min(round_up(span), self.max_cache_len)

    def write_prefix(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy a family's prefix keys/values (per layer (1, H, P, d)) into positions [0, P) of `slot`."""
        for layer, k, v in zip(self.layers, keys, values):
            layer.keys[slot, :, : k.shape[2]] = k[0]
            layer.values[slot, :, : v.shape[2]] = v[0]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` to row `dst` (keeps active rows packed at the front)."""
        for layer in self.layers:
            layer.keys[dst, :, :length] = layer.keys[src, :, :length]
            layer.values[dst, :, :length] = layer.values[src, :, :length]


def text_logits(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache: SlotCache) -> torch.Tensor:
    """One decode step: ids (b, 1) at `positions` (b, 1) into `cache` -> next-token logits (b, V), fp32."""
    hidden = model.model.language_model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                        use_cache=True).last_hidden_state[:, -1]  # (b, D)
    return model.lm_head(hidden).float()  # (b, V)


def _mask(positions: torch.Tensor, span: int) -> torch.Tensor:
    """(b, 1, q, span) bool: query at position p attends keys 0..p of its own row."""
    keys = torch.arange(span, device=positions.device)
    return (keys[None, None, None, :] <= positions[:, None, :, None])


@dataclass
class _Family:
    """A template family: its shared prefix tokens, and their keys/values once computed."""

    prefix: list[int]
    waiting: int  # chats of the family not admitted yet (the prefix is freed after the last)
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)


def _families(chats: list[list[dict]], ids: list[list[int]]) -> tuple[list[int], list[_Family]]:
    """Group chats by everything but their last message; each group's prefix is the longest token prefix its
    prompts share, leaving every prompt at least one token of its own. -> (family index per chat, families)."""
    keys: dict[str, int] = {}
    members: list[list[int]] = []
    of = []
    for i, chat in enumerate(chats):
        key = json.dumps(chat[:-1], sort_keys=True, ensure_ascii=False)
        if key not in keys:
            keys[key] = len(members)
            members.append([])
        members[keys[key]].append(i)
        of.append(keys[key])
    families = []
    for rows in members:
        first = ids[rows[0]]
        n = min(len(ids[r]) for r in rows) - 1
        for r in rows[1:]:
            other = ids[r]
            n = next((j for j in range(n) if other[j] != first[j]), n)
        families.append(_Family(prefix=first[:n], waiting=len(rows)))
    return of, families


@torch.no_grad()
def generate_text(
    bundle: JanusBundle,
    chats: list[list[dict]],
    *,
    seed: int | list[int] = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int | str = 16,
    greedy: bool = False,
    compile_mode: str | None = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Each chat (system/user/assistant messages, ending with a user turn) -> the decoded new text.

    Special tokens are skipped in the decoded text. Chat i samples from its own generator seeded by seed[i], so its
    answer does not depend on the other chats, on `batch_size` (rows decoded together; "auto" = by free memory on a
    GPU, see `ospo_core.janus.memory`) or on `compile_mode` (see `resolve_compile_mode`; speed only).
    `progress(done, total)` is called whenever chats finish.
    """
    tokens = generate_tokens(bundle, chats, seed=seed, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, greedy=greedy,
                             compile_mode=compile_mode, progress=progress)
    return [bundle.tokenizer.decode(row, skip_special_tokens=True) for row in tokens]


@torch.no_grad()
def generate_tokens(
    bundle: JanusBundle,
    chats: list[list[dict]],
    *,
    seed: int | list[int] = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int | str = 16,
    greedy: bool = False,
    compile_mode: str | None = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """`generate_text` before decoding: each chat's new token ids, up to (without) its EOS."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    mode = resolve_compile_mode(compile_mode, bundle.device)
    seeds = as_seeds(seed, len(chats))
    if not chats:
        return []
    tok = bundle.tokenizer
    ids = [tok(render_chat(bundle.processor, chat))["input_ids"] for chat in chats]
    of, families = _families(chats, ids)
    longest_prefix = max(len(f.prefix) for f in families)
    longest_suffix = max(len(row) - len(families[f].prefix) for row, f in zip(ids, of))
    length = round_up(longest_prefix + longest_suffix + max_new_tokens)
    per_row = kv_bytes_per_position(bundle.model) * length + 8 * bundle.model.config.text_config.vocab_size
    slots = resolve_batch(batch_size, "text", bundle.device, per_row, limit=len(chats),
                          reserve_bytes=kv_bytes_per_position(bundle.model) * longest_prefix)
    engine = _Engine(bundle, slots, length, mode, temperature, top_p, greedy)
    return engine.run(ids, of, families, seeds, max_new_tokens, progress)


class _Engine:
    """The continuous-batching loop over one `SlotCache`."""

    def __init__(self, bundle, slots, length, mode, temperature, top_p, greedy):
        self.bundle, self.model, self.device = bundle, bundle.model, bundle.device
        self.cache = SlotCache(self.model, slots, length)
        self.slots, self.compiled = slots, mode is not None
        self.step = torch.compile(text_logits, mode=mode, dynamic=None) if self.compiled else text_logits
        self.sampling = dict(temperature=temperature, top_p=top_p, greedy=greedy)
        self.eos, self.pad = bundle.tokenizer.eos_token_id, bundle.tokenizer.pad_token_id

    def _prefix(self, family: _Family) -> None:
        """The family's prefix through the model once (batch 1) -> its per-layer keys and values."""
        if family.keys or not family.prefix:
            return
        cache = DynamicCache(config=self.model.config.text_config)
        ids = torch.tensor([family.prefix], device=self.device)  # (1, P)
        self.model.model.language_model(input_ids=ids, cache=cache, use_cache=True)
        family.keys = [layer.keys for layer in cache.layers]  # (1, H, P, d) each
        family.values = [layer.values for layer in cache.layers]

    def run(self, ids, of, families, seeds, max_new, progress=None) -> list[list[int]]:
        n, done = len(ids), 0
        # Chats queue family by family (stable), so one family's prefix is held at a time in the common case.
        queue = sorted(range(n), key=lambda i: of[i])[::-1]  # popped from the end
        uniforms = None if self.sampling["greedy"] else row_uniforms(seeds, max_new, self.device)  # (N, max_new)
        out: list[list[int]] = [[] for _ in range(n)]
        chat = [-1] * self.slots  # chat held by each slot; slots [0, active) are the active ones
        length = [0] * self.slots  # positions each slot has in the cache
        active = 0
        last = torch.zeros(self.slots, 1, dtype=torch.long, device=self.device)  # (slots, 1) token to feed next
        pos = torch.zeros(self.slots, 1, dtype=torch.long, device=self.device)  # (slots, 1) where it goes
        chat_dev = torch.zeros(self.slots, dtype=torch.long, device=self.device)  # (slots,) for the uniforms
        step_dev = torch.zeros(self.slots, dtype=torch.long, device=self.device)  # (slots,) tokens drawn so far
        while queue or active:
            free = self.slots - active
            if queue and (active == 0 or free >= max(1, self.slots // 4)):
                admitted = [queue.pop() for _ in range(min(free, len(queue)))]
                nxt = self._admit(admitted, active, ids, of, families, uniforms)
                for k, (c, t) in enumerate(zip(admitted, nxt)):
                    s = active + k
                    chat[s], length[s] = c, len(ids[c])
                    out[c].append(t)
                chat_dev[active : active + len(admitted)] = torch.tensor(admitted, device=self.device)
                step_dev[active : active + len(admitted)] = 1
                last[active : active + len(admitted), 0] = torch.tensor(nxt, device=self.device)
                active += len(admitted)
            else:
                b = self.slots if self.compiled else active  # a compiled step keeps one shape: every slot
                pos[:b, 0] = torch.tensor(length[:b], device=self.device)
                span = round_up(max(length[:b]) + 1)
                self.cache.set_rows(0, b, pos[:b], span)
                logits = self.step(self.model, last[:b], _mask(pos[:b], self.cache.span), pos[:b], self.cache)
                u = None if uniforms is None else uniforms[chat_dev[:b], step_dev[:b].clamp(max=max_new - 1)]
                drawn = sample_tokens(logits, u, **self.sampling)  # (b,)
                last[:b, 0] = drawn
                step_dev[:b] += 1
                for s, t in enumerate(drawn[:active].tolist()):
                    out[chat[s]].append(t)
                    length[s] += 1
            # Rows that drew EOS or spent their budget free their slots; the last active row moves into the gap.
            s, finished = 0, done
            while s < active:
                c = chat[s]
                if out[c][-1] == self.eos or len(out[c]) >= max_new:
                    done += 1
                    active -= 1
                    if s != active:
                        self.cache.move_row(active, s, length[active])
                        chat[s], length[s] = chat[active], length[active]
                        for buf in (last, chat_dev, step_dev):
                            buf[s] = buf[active]
                    chat[active] = -1
                    continue
                s += 1
            if progress is not None and done > finished:
                progress(done, n)
        return [row[:-1] if row and row[-1] == self.eos else row for row in out]

    def _admit(self, admitted, start, ids, of, families, uniforms) -> list[int]:
        """Put chats into slots start.. : prefix keys/values copied, suffixes prefilled together -> first tokens."""
        suffixes = []
        for k, c in enumerate(admitted):
            family = families[of[c]]
            self._prefix(family)
            if family.keys:
                self.cache.write_prefix(start + k, family.keys, family.values)
            family.waiting -= 1
            if not family.waiting:  # its last chat is in: the prefix is no longer needed
                family.keys, family.values = [], []
            suffixes.append(ids[c][len(family.prefix) :])
        b, width = len(admitted), max(len(s) for s in suffixes)
        suffix = torch.full((b, width), self.pad, dtype=torch.long)  # (b, S) right-padded
        starts = torch.tensor([len(ids[c]) - len(s) for c, s in zip(admitted, suffixes)])
        for k, s in enumerate(suffixes):
            suffix[k, : len(s)] = torch.tensor(s)
        positions = (starts[:, None] + torch.arange(width)[None]).to(self.device)  # (b, S)
        # Padding positions write past the row's end (overwritten later, never attended); they stay in the buffer.
        self.cache.set_rows(start, start + b, positions, int(positions.max()) + 1)
        hidden = self.model.model.language_model(
            input_ids=suffix.to(self.device), attention_mask=_mask(positions, self.cache.span),
            position_ids=positions, cache=self.cache, use_cache=True).last_hidden_state  # (b, S, D)
        ends = torch.tensor([len(s) - 1 for s in suffixes], device=self.device)
        logits = self.model.lm_head(hidden[torch.arange(b, device=self.device), ends]).float()  # (b, V)
        u = None if uniforms is None else uniforms[torch.tensor(admitted, device=self.device), 0]
        return sample_tokens(logits, u, **self.sampling).tolist()
