"""Random-weight Janus models at benchmark sizes, built from the tiny model's tokenizer and processor builders.

`mid` is the CPU benchmark model: every component a real Janus-Pro has (Llama LM, SigLIP encoder + aligner, VQ
generation head and embeddings), 576 image tokens at 384 px, 58M parameters (25M in the LM's 8 layers of width
512, 8.7M in the generation head, 16M in the text embeddings), so a 576-step sample takes seconds on one core.
`1b` and `7b` carry the published Janus-Pro widths and depths (text vocab 102400, SigLIP-L/16 at 384 px, the
VQ-16 autoencoder with its 16384-entry codebook); the tokenizer is the tiny one, so only its first few hundred
text ids are ever fed, which changes nothing about the cost of a forward. `toy` only checks scripts end to end.
"""

from __future__ import annotations

import torch
from transformers import JanusConfig, JanusForConditionalGeneration

from ospo_core.janus.load import JanusBundle, _ensure_generation_config
from ospo_core.janus.tiny import IMAGE, build_tiny_processor, build_tiny_tokenizer

IMAGE_SIZE = 384  # 24 x 24 grid of 16-px patches = 576 image tokens

# text: (layers, hidden, heads, kv heads, intermediate, vocab); vision: (layers, hidden, heads);
# gen: generation-head width; vq: overrides of the VQ autoencoder (transformers' defaults are Janus-Pro's VQ-16)
SMALL_VQ = dict(base_channels=32, latent_channels=32, num_res_blocks=1)
SIZES = {
    "toy": dict(text=(2, 64, 4, 4, 128, 1000), vision=(1, 32, 2), gen=64, vq=SMALL_VQ),
    "mid": dict(text=(8, 512, 8, 8, 1376, 32000), vision=(4, 256, 4), gen=512, vq=SMALL_VQ),
    "1b": dict(text=(24, 2048, 16, 16, 5632, 102400), vision=(24, 1024, 16), gen=2048, vq={}),
    "7b": dict(text=(30, 4096, 32, 32, 11008, 102400), vision=(24, 1024, 16), gen=4096, vq={}),
}


def bench_config(size: str, tokenizer) -> JanusConfig:
    if size not in SIZES:
        raise ValueError(f"unknown benchmark size {size!r}; pick one of {sorted(SIZES)}")
    spec = SIZES[size]
    layers, hidden, heads, kv_heads, intermediate, vocab = spec["text"]
    v_layers, v_hidden, v_heads = spec["vision"]
    grid = IMAGE_SIZE // 16
    text_config = dict(
        model_type="llama", vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden,
        intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(
        hidden_size=v_hidden, num_hidden_layers=v_layers, num_attention_heads=v_heads, image_size=IMAGE_SIZE,
        patch_size=16, projection_dim=hidden, depth=2, num_image_tokens=grid * grid, mlp_ratio=4.0,
    )
    vq_config = dict(num_embeddings=16384, projection_dim=spec["gen"], image_token_embed_dim=hidden, **spec["vq"])
    return JanusConfig(text_config=text_config, vision_config=vision_config, vq_config=vq_config,
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE))


def build_janus_for_bench(size: str = "mid", *, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, seed: int = 0) -> JanusBundle:
    """A random-weight Janus of the given size as a bundle on `device`, built directly in `dtype`."""
    tokenizer = build_tiny_tokenizer()
    config = bench_config(size, tokenizer)
    # Built on the device in the target dtype: a 7B model made in fp32 on the host would need 28 GB first.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration._from_config(config, dtype=dtype)
    processor = build_tiny_processor(tokenizer, IMAGE_SIZE)
    _ensure_generation_config(model, processor)
    model.eval()
    return JanusBundle(model=model, processor=processor, fingerprint=f"bench-{size}-{seed}", source=f"bench:{size}")


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
