"""The text engine (shared prefixes, slot cache, continuous batching), the chunked head log-softmax, batch sizes by
memory and the round estimate: exact where they replace a plain computation, and the estimate's table and bounds."""

import pytest
import torch

from ospo_core.janus.chat import few_shot_chat, render_chat
from ospo_core.janus.memory import CPU_BATCH, resolve_batch
from ospo_core.janus.score import head_logprobs
from ospo_core.janus.text import generate_text, generate_tokens
from ospo_core.templates import negative_chat


def _chats():
    """Two template families (three and two chats, different prompt lengths) and a chat of its own."""
    prompts = ["a red apple on a table", "two blue cats", "a green car by a tall house"]
    chats = [negative_chat("attribute1_color", "replace", p, seed=0) for p in prompts]
    chats += [few_shot_chat("Rewrite the prompt.", [("a dog", "a small brown dog")], p) for p in prompts[:2]]
    return chats + [[{"role": "user", "content": "Write one prompt."}]]


def test_greedy_text_equals_transformers_generate_chat_by_chat(tiny):
    """Prefix once per family, suffixes prefilled together, rows admitted as others finish: the same greedy
    tokens as transformers' generate on each full prompt alone."""
    chats = _chats()[1:5]
    ours = generate_tokens(tiny, chats, greedy=True, max_new_tokens=12, batch_size=2)
    eos = tiny.tokenizer.eos_token_id
    for chat, row in zip(chats, ours):
        enc = tiny.tokenizer(render_chat(tiny.processor, chat), return_tensors="pt")
        ref = tiny.model.generate(**enc, generation_mode="text", max_new_tokens=12, do_sample=False,
                                  pad_token_id=tiny.tokenizer.pad_token_id)[0, enc["input_ids"].shape[1] :].tolist()
        assert row == (ref[: ref.index(eos)] if eos in ref else ref)


def test_a_chat_samples_the_same_answer_in_any_batch(tiny):
    chats = _chats()
    seeds = [5, 6, 7, 8, 9, 10]
    kwargs = dict(seed=seeds, temperature=1.0, top_p=0.9, max_new_tokens=16)
    every = generate_text(tiny, chats, batch_size=6, **kwargs)
    reported = []  # progress as chats finish: one slot at a time, so one chat at a time
    assert generate_text(tiny, chats, batch_size=1, progress=lambda *p: reported.append(p), **kwargs) == every
    assert reported == [(done, 6) for done in range(1, 7)]
    assert generate_text(tiny, chats, batch_size="auto", **kwargs) == every
    assert generate_text(tiny, chats[3:4], seed=8, temperature=1.0, top_p=0.9, max_new_tokens=16) == [every[3]]
    same = generate_text(tiny, [chats[0]] * 4, seed=[1, 2, 3, 4], max_new_tokens=16, batch_size=2)
    assert len(set(same)) > 1  # one chat, four seeds: four draws, not one answer copied


def test_the_few_shot_prefix_runs_once_per_family(tiny, monkeypatch):
    """Six chats of one family: the prompt tokens fed to the model are one prefix plus six short suffixes."""
    lm = tiny.model.model.language_model
    fed = []
    original = lm.forward

    def counting(*args, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[1] > 1:  # prefill calls, not decode steps
            fed.append(input_ids.numel())
        return original(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(lm, "forward", counting)
    chats = [negative_chat("attribute1_color", "replace", f"a {c} apple", seed=0)
             for c in ("red", "blue", "green", "white", "black", "pink")]
    generate_text(tiny, chats, greedy=True, max_new_tokens=2, batch_size=6)
    full = sum(len(tiny.tokenizer(render_chat(tiny.processor, c))["input_ids"]) for c in chats)
    assert sum(fed) < full / 4, (sum(fed), full)


def test_chunked_head_log_softmax_equals_the_whole_one_with_its_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    targets = torch.randint(50, (2, 7))
    whole = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (g_whole,) = torch.autograd.grad(whole.sum(), hidden)
    chunked = head_logprobs(head, hidden, targets, chunk=3)  # 14 positions in pieces of 3, checkpointed
    (g_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(g_chunked, g_whole)


def test_auto_batch_is_small_on_the_cpu_and_bad_sizes_are_named():
    cpu = torch.device("cpu")
    assert resolve_batch("auto", "text", cpu, 10**6, limit=1000) == CPU_BATCH
    assert resolve_batch("auto", "text", cpu, 10**6, limit=3) == 3
    assert resolve_batch(64, "render", cpu, 0, limit=10) == 10
    with pytest.raises(ValueError, match="batch_size must be a positive integer or 'auto', got 'big'"):
        resolve_batch("big", "text", cpu, 0, limit=10)


def test_paper_estimate_table_is_never_below_the_bound_and_scales_with_gpus(capsys):
    from ospo_cli.main import main
    from ospo_core.config import preset_config
    from ospo_core.estimate import estimate

    one = estimate(preset_config("paper"), size="7b", device="h200")
    eight = estimate(preset_config("paper"), size="7b", device="h200", gpus=8)
    assert [e.stage for e in one] == ["prompts", "perturb", "densify", "render", "questions", "vqa", "select", "train"]
    assert sum(e.seconds for e in one) > sum(e.bound_seconds for e in one)
    assert all(e.seconds >= e.bound_seconds > 0 for e in one if e.stage != "select")
    assert sum(e.seconds for e in eight) < sum(e.seconds for e in one) / 5
    assert main(["estimate", "--preset", "paper", "--model-size", "7b", "--device", "h200", "--gpus", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("total: ") and out[-1].endswith(" h") and any(line.startswith("train ") for line in out)
    assert main(["estimate", "--device", "tpu"]) == 2
    assert "no device profile 'tpu'; known: ['cpu', 'h200']" in capsys.readouterr().err


def test_a_shapes_world_round_is_estimated_without_text_decoding():
    """The shapes world writes the text stages from each caption's structure: the estimate counts no decoding there,
    only rendering, scoring and training."""
    from ospo_core.config import PRESETS, RoundConfig
    from ospo_core.estimate import TEXT_STAGES, estimate

    shapes = estimate(RoundConfig.model_validate(PRESETS["testbed"]), size="tiny", device="cpu")
    paper = estimate(RoundConfig.model_validate(PRESETS["demo"]), size="tiny", device="cpu")
    assert all(e.work == 0 for e in shapes if e.stage in TEXT_STAGES)
    assert all(e.work > 0 for e in paper if e.stage in TEXT_STAGES)
    assert all(e.work > 0 for e in shapes if e.stage in ("render", "vqa", "train"))
