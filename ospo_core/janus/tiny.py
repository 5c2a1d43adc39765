"""The built-in tiny Janus: random weights, a tokenizer trained on the fly, fully offline.

It exists so that every stage, the trainer, the flows and the tests run on a laptop CPU with no download.
Its text is nonsense and its images are noise; the code paths are the real ones (it is saved to a folder and
loaded back through `load_janus(folder)` exactly like a Janus-Pro checkpoint).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    PreTrainedTokenizerFast,
)

from ospo_core.janus.chat import CHAT_TEMPLATE

# The special tokens carry Janus-Pro's own spellings so that templates and parsers see what a real model emits.
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE, BOI, EOI]

# A small English corpus so that the byte-level BPE learns whole words for the method's vocabulary.
_CORPUS = """
Prompt: a red apple on a wooden table; Concepts and relations: apple, red, table; Relation: (apple, red)
Contrastive Prompt: a green apple on a wooden table. Step 1. Step 2. Step 3. Step 4. Prompt 1 Dense: Prompt 2 Dense:
Questions: Is there a red apple? Is the apple on the table? Are there three cats? yes Yes no No
<|User|>: <|Assistant|>: Please answer 'yes' or 'no' without explanation.
red blue green yellow white black purple orange pink brown gray silver golden wooden metallic fluffy leather glass
round square triangular oval cubic cylindrical circle triangle rectangle star heart cube sphere
left right top bottom above below under next to in front of behind hidden by side of near
one two three four five six seven eight a an the and of with in on at is are there
cat dog bird horse car bus bench chair table book cup bottle apple banana flower tree house boat clock lamp
person man woman child holds wears talks rides eats sits reads plays watches
replace swap drop contrastive prompt dense object attribute relation number spatial texture shape color
""" * 4

TINY_IMAGE_SIZE = 64  # pixels; with 16-px patches this is a 4x4 grid = 16 image tokens
TINY_CODEBOOK = 64


def build_tiny_tokenizer(vocab_size: int = 600, extra_corpus: str = "") -> PreTrainedTokenizerFast:
    """A byte-level BPE with the Janus special tokens, trained on `_CORPUS` (deterministic, ~50 ms).

    `extra_corpus` is appended to the corpus so that a derived model learns whole words for its own vocabulary
    (the testbed's shapes world); empty gives the built-in tokenizer.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((_CORPUS + extra_corpus).splitlines(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Janus-Pro's tokenizer, every encoded text starts with BOS.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )


def build_tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int = TINY_IMAGE_SIZE,
    codebook_size: int = TINY_CODEBOOK,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> JanusConfig:
    """A Janus config with every component shrunk: a small Llama (default 2 layers, d=64), 1-layer SigLIP, a tiny VQ.

    `codebook_size` is the number of image tokens the generation head chooses from, `hidden_size` and `num_layers`
    size the language model (the testbed sets all three: its tokens are scene cells, and it must learn to draw)."""
    patch = 16
    grid = image_size // patch
    vocab = len(tokenizer)
    text_config = dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=hidden_size,  # the aligner maps image features into the language model
        depth=1,
        num_image_tokens=grid * grid,
        mlp_ratio=2.0,
    )
    vq_config = dict(
        embed_dim=8,
        num_embeddings=codebook_size,
        latent_channels=32,
        base_channels=32,
        # Four downsampling levels (len-1) give the 16x reduction Janus uses: 64 px -> 4x4 tokens.
        channel_multiplier=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        projection_dim=hidden_size,
        image_token_embed_dim=hidden_size,
        num_hidden_layers=2,
    )
    return JanusConfig(
        text_config=text_config,
        vision_config=vision_config,
        vq_config=vq_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )


def build_tiny_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = TINY_IMAGE_SIZE) -> JanusProcessor:
    image_processor = JanusImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    num_image_tokens = (image_size // 16) ** 2
    return JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=num_image_tokens,
    )


def build_tiny_janus(
    seed: int = 0,
    image_size: int = TINY_IMAGE_SIZE,
    *,
    codebook_size: int = TINY_CODEBOOK,
    hidden_size: int = 64,
    num_layers: int = 2,
    extra_corpus: str = "",
) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """Random-weight tiny Janus + processor, identical for given arguments (see the builders for each one)."""
    tokenizer = build_tiny_tokenizer(extra_corpus=extra_corpus)
    config = build_tiny_config(tokenizer, image_size, codebook_size, hidden_size, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    model.generation_config.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)}
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, build_tiny_processor(tokenizer, image_size)
