"""Random-weight judge folders for tests, built offline in well under a second each: an OWL-ViT detector and CLIP
(the geneval judge's detector/ and clip/) and BLIP-VQA (the vqa judge's vqa/), in transformers format."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

_WORDS = ("a photo of the an is there are two three exactly one no fewer than to left right of above below colored "
          "object red orange yellow green blue purple pink brown black white dog cat bench clock teddy bear wine "
          "glass apple fire hydrant sports ball person yes no ? - bus car")


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE with CLIP-like specials (`clip`) or a WordPiece with BERT-like specials (`bert`)."""
    if kind == "clip":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # id 0 is padding: OWL-ViT takes a query whose first id is 0 for an empty one
        specials = ["<|pad|>", "<|startoftext|>", "<|endoftext|>"]
        tok.train_from_iterator([_WORDS] * 4, trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[(s, tok.token_to_id(s)) for s in specials[1:]])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[1], eos_token=specials[2],
                                       pad_token=specials[0])
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]"]
    tok.train_from_iterator([_WORDS] * 4, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials,
                                                                    show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", bos_token="[DEC]")


def _tower(vocab: int, **extra) -> tuple[dict, dict]:
    text = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=24, **extra)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=16)
    return text, vision


def build_clip(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer("clip")
    text, vision = _tower(len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_owlvit(folder: Path, seed: int = 0) -> Path:
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor

    torch.manual_seed(seed)
    tokenizer = _tokenizer("clip")
    text, vision = _tower(len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    model = OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():  # a random detector is sure of little; lift its confidences so some boxes pass 0.3
        model.class_head.logit_shift.bias.fill_(2.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    OwlViTImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_blip_vqa(folder: Path, seed: int = 0) -> Path:
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessor

    torch.manual_seed(seed)
    tokenizer = _tokenizer("bert")
    text, vision = _tower(len(tokenizer), bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        folder)
    tokenizer.save_pretrained(folder)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def geneval_folder(root: Path) -> Path:
    """root/detector (OWL-ViT) + root/clip: what `--judge geneval --judge-model root` loads."""
    build_owlvit(root / "detector")
    build_clip(root / "clip")
    return root


def vqa_folder(root: Path) -> Path:
    """root/vqa (BLIP-VQA) + root/clip: what `--judge vqa --judge-model root` loads."""
    build_blip_vqa(root / "vqa")
    build_clip(root / "clip")
    return root
