"""The vqa judge: a transformers VQA model (BLIP-VQA) answers each yes/no question, as T2I-CompBench scores
attribute binding (Huang et al. 2023, BLIPvqa_eval), and CLIP scores non-spatial prompts (its CLIPScore_eval).

T2I-CompBench's BLIP-VQA number, from its code: the answer decoder starts from its BOS token, one step; the softmax
of that first step gives P(yes) and P(no), and the question's score is P(yes) / (P(yes) + P(no)); an image's score is
the product over its questions (T2I-CompBench asks each noun phrase of the prompt; here the evaluation's own question
sheet is asked). Its non-spatial number is CLIPScore: the cosine similarity of CLIP's image and prompt embeddings
(not x 100, not clipped). So per image:

    p_yes = P(yes) / (P(yes) + P(no)),  p_no = 1 - p_yes           (each question)
    score = prod over questions of p_yes, or cos(CLIP(image), CLIP(prompt)) for a non-spatial category
"""

from __future__ import annotations

from functools import cached_property

import torch

from ospo_core.judges import folders

# The categories T2I-CompBench scores with CLIPScore (its own name, and the questions stage's family name).
CLIP_CATEGORIES = ("non_spatial", "non-spatial")


class VQAJudge:
    """BLIP-VQA (`vqa/`) and CLIP (`clip/`) from the folder `source`."""

    name = "vqa"
    code = (folders,)
    columns = ()
    unknown_reason = "unreadable_question"  # never used: the VQA model answers any question

    def __init__(self, model=None, source: str | None = None, same: bool = False):
        del model, same  # judges with its own models
        self.vqa_dir = folders.judge_folder(source, "vqa", self.name)
        self.clip_dir = folders.judge_folder(source, "clip", self.name)
        self.identity = f"{source}:{folders.folder_identity(source)}"

    @cached_property
    def vqa(self):
        from transformers import AutoImageProcessor, AutoTokenizer, BlipForQuestionAnswering

        model = folders.from_folder(BlipForQuestionAnswering, self.vqa_dir).to(folders.device()).eval()
        tokenizer = folders.from_folder(AutoTokenizer, self.vqa_dir)
        yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
        return model, tokenizer, folders.from_folder(AutoImageProcessor, self.vqa_dir), yes, no

    @torch.no_grad()
    def p_yes(self, image, questions: list[str]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) at the answer decoder's first step, per question about one image."""
        model, tokenizer, processor, yes, no = self.vqa
        pixels = processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
        image_embeds = model.vision_model(pixel_values=pixels.to(model.device, model.dtype)).last_hidden_state
        image_embeds = image_embeds.expand(len(questions), -1, -1)  # (Q, P, D): one image, its questions
        enc = tokenizer(questions, padding=True, return_tensors="pt").to(model.device)
        states = model.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                    encoder_hidden_states=image_embeds).last_hidden_state  # (Q, T, D)
        start = torch.full((len(questions), 1), model.decoder_start_token_id, device=model.device)
        logits = model.text_decoder(input_ids=start, encoder_hidden_states=states,
                                    encoder_attention_mask=enc["attention_mask"]).logits[:, 0].float()  # (Q, V)
        probs = logits.softmax(-1)
        return (probs[:, yes] / (probs[:, yes] + probs[:, no])).tolist()

    def answer(self, rows, questions, batch_size):
        from ospo_core.records import decode_image

        out = []
        for row, qs in zip(rows, questions):
            image = decode_image(row["image"])
            out.append(None if image is None else [(p, 1.0 - p) for p in self.p_yes(image, qs)] if qs else [])
        return out

    @cached_property
    def clip(self):
        return folders.load_clip(str(self.clip_dir))

    def image_scores(self, rows: list[dict], answers: list) -> list[float | None]:
        """T2I-CompBench's per-image number: CLIPScore for a non-spatial category, else the product of p_yes."""
        from ospo_core.records import decode_image

        out: list[float | None] = []
        for row, scores in zip(rows, answers):
            if scores is None:
                out.append(None)
            elif row.get("category") in CLIP_CATEGORIES:
                image = folders.clip_image_features(self.clip, [decode_image(row["image"])])
                text = folders.clip_text_features(self.clip, [row["prompt"]])
                out.append(float((image @ text.T).item()))
            else:
                out.append(float(torch.tensor([y for y, _ in scores], dtype=torch.float64).prod().item()))
        return out
