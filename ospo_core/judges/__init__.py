"""Judges other than the model itself: they answer the yes/no questions about an image that self-VQA answers, for
the self-VQA stage (`VQAConfig.judge`) and for held-out evaluation (`EvalConfig.judge`), registered by name in
`ospo_core.plugins.JUDGES`.

- `fixed` (fixed.py): a frozen Janus (a round's start model, or any Janus folder). It cannot learn to say "yes"
  while the round trains, which is why the promotion gate decides on it.
- `geneval` (geneval.py): GenEval's procedure (object detector + CLIP colour classification, its thresholds and its
  relative-position rule) over the questions it can read back into GenEval clauses.
- `vqa` (vqa.py): a transformers VQA model (BLIP-VQA), P(yes) / (P(yes) + P(no)) as T2I-CompBench scores attribute
  binding, and CLIPScore for non-spatial prompts.

Every judge loads its weights from a local folder in transformers format (folders.py); nothing is downloaded.
"""
