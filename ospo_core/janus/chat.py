"""The one chat template, used by every caller: generation, self-VQA scoring, text stages and training.

Janus-Pro's "deepseek" format with roles `<|User|>` / `<|Assistant|>`. The authors' V2 code uses `User:` /
`Assistant:` for generation and training but `<|User|>` for inference and benchmarks; we keep one spelling
everywhere (train = infer) and it is Janus-Pro's native one.

The template is a Jinja string installed on the processor, so `processor.apply_chat_template` and transformers'
own `generate` see exactly the prompt the functions below build.
"""

from __future__ import annotations

import torch

USER, ASSISTANT = "<|User|>", "<|Assistant|>"
EOS_TEXT = "<｜end▁of▁sentence｜>"
IMAGE_PLACEHOLDER, BEGIN_OF_IMAGE = "<image_placeholder>", "<begin_of_image>"

# Janus-Pro's default system prompt for understanding (used by self-VQA scoring).
UNDERSTANDING_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
YES_NO_SUFFIX = " Please answer 'yes' or 'no' without explanation."

# system: "{s}\n\n"; user: "<|User|>: {c}\n\n"; assistant: "<|Assistant|>: {c}<eos>"; an image part is the
# placeholder plus a newline (the processor expands it to <begin_of_image> + N image tokens + <end_of_image>).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '" + IMAGE_PLACEHOLDER + "\\n' -%}"
    "{%- else -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{%- if content -%}{{ content }}{{ '\\n\\n' }}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}" + USER + ": {{ content }}{{ '\\n\\n' }}"
    "{%- else -%}" + ASSISTANT + ": {{ content }}" + EOS_TEXT + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + ":{%- endif -%}"
)


def render_chat(processor, messages: list[dict]) -> str:
    """A chat (list of {role, content}) -> the prompt text, ending with an open assistant turn."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def generation_prompt(processor, text: str) -> str:
    """Gen prompt x for image generation and image-token likelihood: user turn + open assistant + <begin_of_image>."""
    return render_chat(processor, [{"role": "user", "content": text.strip()}]) + BEGIN_OF_IMAGE


def understanding_chat(question: str) -> list[dict]:
    """The self-VQA chat: default system prompt, image + yes/no question, open assistant turn."""
    return [
        {"role": "system", "content": UNDERSTANDING_SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.strip() + YES_NO_SUFFIX}]},
    ]


def few_shot_chat(system: str, shots: list[tuple[str, str]], query: str) -> list[dict]:
    """A text chat: system prompt, (user, assistant) shots, then the query as the last user turn."""
    messages = [{"role": "system", "content": system}]
    for user, assistant in shots:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": query}]


def unconditional_ids(input_ids: torch.Tensor, *, bos_id: int, boi_id: int, pad_id: int) -> torch.Tensor:
    """The classifier-free-guidance twin of gen-prompt ids: every token but BOS and <begin_of_image> -> pad.

    The attention mask stays that of the conditional row (as in the authors' code and transformers' generate).
    """
    keep = (input_ids == bos_id) | (input_ids == boi_id)
    return torch.where(keep, input_ids, torch.full_like(input_ids, pad_id))
