"""The model layer: sampler, scorer and log-likelihoods against transformers' own computations."""

import json
import socket

import pytest
import torch
from PIL import Image

from ospo_core.janus import image as image_mod
from ospo_core.janus.chat import generation_prompt, render_chat, understanding_chat
from ospo_core.janus.image import gen_prompt_batch, sample_images
from ospo_core.janus.load import ModelLoadError, apply_adapter, load_janus, save_janus, write_adapter_meta
from ospo_core.janus.score import encode_images, image_logprobs, score_yes_no
from ospo_core.janus.text import generate_text

PROMPTS = ["a red apple on a wooden table", "two cats", "a blue bus to the left of a yellow house"]


def test_tiny_is_deterministic_and_small(tiny):
    again = load_janus("tiny", device="cpu")
    assert again.fingerprint == tiny.fingerprint
    assert load_janus("tiny", device="cpu", seed=1).fingerprint != tiny.fingerprint
    assert 16 <= tiny.num_image_tokens <= 64


def test_processor_carries_the_one_template(tiny):
    chat = [{"role": "user", "content": "a cat"}]
    via_processor = tiny.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert generation_prompt(tiny.processor, "a cat") == via_processor + "<begin_of_image>"
    assert via_processor == "<|User|>: a cat\n\n<|Assistant|>:"
    vqa = render_chat(tiny.processor, understanding_chat("Is there a cat?"))
    assert "<image_placeholder>\nIs there a cat? Please answer 'yes' or 'no' without explanation." in vqa


def test_greedy_sampler_matches_transformers_generate(tiny):
    ours = sample_images(tiny, PROMPTS, greedy=True, cfg_weight=5.0, batch_size=8).tokens
    for row, prompt in enumerate(PROMPTS):
        ids, mask = gen_prompt_batch(tiny, [prompt])
        ref = tiny.model.generate(input_ids=ids, attention_mask=mask, generation_mode="image",
                                  guidance_scale=5.0, do_sample=False)
        assert torch.equal(ours[row], ref[0])


def test_sampled_guided_logits_equal_teacher_forced_transformers(tiny, monkeypatch):
    """Each step's guided logits equal a no-cache transformers forward over prompt + the tokens drawn so far."""
    seen = []
    real = image_mod.sample_tokens
    monkeypatch.setattr(image_mod, "sample_tokens", lambda logits, *a, **k: seen.append(logits) or real(logits, *a, **k))
    w = 3.0
    tokens = sample_images(tiny, PROMPTS[:1], cfg_weight=w, seed=7).tokens  # (1, N)
    model = tiny.model
    ids, _ = gen_prompt_batch(tiny, PROMPTS[:1])
    uncond = ids.clone()
    keep = (ids == tiny.tokenizer.bos_token_id) | (ids == tiny.token_id("<begin_of_image>"))
    uncond[~keep] = tiny.tokenizer.pad_token_id
    with torch.no_grad():
        img = model.prepare_embeddings_for_image_generation(tokens[:, :-1])  # the fed-back tokens
        guided = []
        for row_ids in (ids, uncond):
            embeds = torch.cat([model.get_input_embeddings()(row_ids), img], dim=1)
            hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
            guided.append(model.model.generation_head(hidden[:, ids.shape[1] - 1 :]).float())
        ref = guided[1] + w * (guided[0] - guided[1])  # (1, N, V)
    torch.testing.assert_close(torch.stack(seen, dim=1), ref, atol=1e-4, rtol=0)


def test_seeds_and_batch_composition(tiny):
    a = sample_images(tiny, PROMPTS, seed=[1, 2, 3], batch_size=3).tokens
    b = sample_images(tiny, PROMPTS, seed=[1, 2, 3], batch_size=2).tokens
    alone = sample_images(tiny, PROMPTS[1:2], seed=2).tokens
    assert torch.equal(a, b)
    assert torch.equal(a[1], alone[0])
    assert not torch.equal(a[0], sample_images(tiny, PROMPTS[:1], seed=99).tokens[0])
    imgs = sample_images(tiny, PROMPTS[:1], seed=1).images
    assert imgs[0].mode == "RGB" and imgs[0].size == (64, 64)


def test_auto_compile_mode_is_eager_on_the_cpu_and_bad_modes_are_named(tiny):
    # The render and eval stages default to "auto" (CUDA graphs on a GPU): on the CPU it is the eager sampler.
    eager = sample_images(tiny, PROMPTS, seed=[1, 2, 3]).tokens
    assert torch.equal(sample_images(tiny, PROMPTS, seed=[1, 2, 3], compile_mode="auto").tokens, eager)
    assert torch.equal(sample_images(tiny, PROMPTS, seed=[1, 2, 3], compile_mode="eager").tokens, eager)
    with pytest.raises(ValueError, match="compile_mode must be one of .*'reduce-overhead'.* got 'graphs'"):
        sample_images(tiny, PROMPTS, compile_mode="graphs")


def test_shared_prefix_scoring_equals_full_forward(tiny):
    images = sample_images(tiny, PROMPTS[:2], seed=[3, 4]).images
    questions = [["Is there a red apple?", "Is the apple on a table?", "Is there a wooden table?", "Are there two?"],
                 ["Are there two cats?"]]
    shared = score_yes_no(tiny, images, questions)
    full = score_yes_no(tiny, images, questions, shared_prefix=False)
    assert [len(r) for r in shared] == [4, 1]
    for rs, rf in zip(shared, full):
        torch.testing.assert_close(torch.tensor(rs), torch.tensor(rf), atol=1e-5, rtol=0)
    for p_yes, p_no in shared[0]:
        assert 0 <= p_yes <= 1 and 0 <= p_no <= 1


def test_scoring_bad_input(tiny):
    img = Image.new("RGBA", (17, 33))  # wrong size and mode: converted, not refused
    assert len(score_yes_no(tiny, [img], [["Is there a cat?"]])[0]) == 1
    assert score_yes_no(tiny, [img], [[]]) == [[]]
    with pytest.raises(ValueError, match="empty question"):
        score_yes_no(tiny, [img], [["  "]])
    with pytest.raises(TypeError, match="not a PIL image"):
        score_yes_no(tiny, [b"\x89PNG"], [["Is there a cat?"]])
    with pytest.raises(ValueError, match="one list per image"):
        score_yes_no(tiny, [img], [])


def test_image_logprobs_teacher_forced_and_padding_free(tiny):
    tokens = sample_images(tiny, PROMPTS, seed=5).tokens
    per_token, mean = image_logprobs(tiny, PROMPTS, tokens)
    model = tiny.model
    for row, prompt in enumerate(PROMPTS):  # hand-written: one unpadded sequence, full forward, shift by one
        ids = tiny.tokenizer(generation_prompt(tiny.processor, prompt), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            embeds = torch.cat([model.get_input_embeddings()(ids),
                                model.prepare_embeddings_for_image_generation(tokens[row : row + 1])], 1)
            hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
            logp = torch.log_softmax(model.model.generation_head(hidden[0, ids.shape[1] - 1 : -1]).float(), -1)
        ref = logp.gather(-1, tokens[row].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(per_token[row], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(mean[row], ref.mean(), atol=1e-5, rtol=0)
    weights = torch.ones_like(per_token)
    weights[:, :4] = 3.0
    _, weighted = image_logprobs(tiny, PROMPTS, tokens, weights)
    torch.testing.assert_close(weighted, (per_token * weights).sum(-1) / weights.sum(-1))
    with pytest.raises(ValueError, match="codebook"):
        image_logprobs(tiny, PROMPTS[:1], torch.full((1, tiny.num_image_tokens), tiny.codebook_size))
    with pytest.raises(ValueError, match="shape"):
        image_logprobs(tiny, PROMPTS[:1], torch.zeros(1, 3, dtype=torch.long))


def test_encode_images_gives_codebook_ids(tiny):
    images = sample_images(tiny, PROMPTS[:2], seed=1).images
    ids = encode_images(tiny, images)
    assert ids.shape == (2, tiny.num_image_tokens)
    assert int(ids.min()) >= 0 and int(ids.max()) < tiny.codebook_size


def test_generate_text_is_per_row_reproducible(tiny):
    chats = [[{"role": "user", "content": f"Write prompt number {i}."}] for i in range(3)]
    a = generate_text(tiny, chats, seed=[0, 1, 2], max_new_tokens=12, batch_size=3)
    b = generate_text(tiny, chats[1:2], seed=1, max_new_tokens=12)
    assert a[1] == b[0]
    assert len(a) == 3 and all(isinstance(t, str) for t in a)
    assert generate_text(tiny, [], seed=0) == []


def test_save_load_round_trip(tiny, tmp_path):
    folder = save_janus(tiny, tmp_path / "ckpt")
    loaded = load_janus(folder, device="cpu")
    tokens = sample_images(tiny, PROMPTS[:2], seed=1).tokens
    torch.testing.assert_close(image_logprobs(loaded, PROMPTS[:2], tokens)[0], image_logprobs(tiny, PROMPTS[:2], tokens)[0])
    assert loaded.fingerprint == load_janus(folder, device="cpu").fingerprint


def _lora_adapter(bundle, folder, scale=0.05):
    from peft import LoraConfig, get_peft_model
    from ospo_core.janus.load import LORA_TARGET_REGEX

    fresh = load_janus("tiny", device="cpu")  # a private copy: get_peft_model wraps it in place
    peft = get_peft_model(fresh.model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_REGEX))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    peft.save_pretrained(folder)
    write_adapter_meta(folder, bundle.fingerprint)
    return peft


def test_adapter_round_trip_and_mismatch(tiny, tmp_path):
    peft = _lora_adapter(tiny, tmp_path / "adapter")
    tokens = sample_images(tiny, PROMPTS[:2], seed=1).tokens
    ids, mask = gen_prompt_batch(tiny, PROMPTS[:2])
    from ospo_core.janus.score import image_token_logps

    with torch.no_grad():
        trained = image_token_logps(peft.get_base_model(), ids, mask, tokens)
    merged = load_janus("tiny", device="cpu", adapters=[tmp_path / "adapter"])
    assert merged.fingerprint != tiny.fingerprint
    torch.testing.assert_close(image_logprobs(merged, PROMPTS[:2], tokens)[0], trained, atol=1e-5, rtol=0)
    with pytest.raises(ModelLoadError, match="trained from model"):
        apply_adapter(load_janus("tiny", device="cpu", seed=3), tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match="not a LoRA adapter"):
        apply_adapter(tiny, tmp_path)


def test_bad_model_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_janus(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_janus(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_janus(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="not a Janus"):
        load_janus(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "janus"}))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_janus(tmp_path)


def test_truncated_weights_give_a_clear_error(tiny, tmp_path):
    folder = save_janus(tiny, tmp_path / "ckpt")
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="could not load"):
        load_janus(folder, device="cpu")


def test_no_network_access(tiny, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model layer tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    folder = save_janus(load_janus("tiny", device="cpu"), tmp_path / "ckpt")
    bundle = load_janus(folder, device="cpu")
    samples = sample_images(bundle, PROMPTS[:1], seed=0)
    score_yes_no(bundle, samples.images, [["Is there a cat?"]])
    generate_text(bundle, [[{"role": "user", "content": "hi"}]], max_new_tokens=4)


def test_greedy_sampler_matches_generate_past_one_cache_block():
    """256 image tokens: the static cache's attention span grows past its first 64-position block."""
    from ospo_core.janus.load import JanusBundle, _ensure_generation_config
    from ospo_core.janus.tiny import build_tiny_janus

    model, processor = build_tiny_janus(0, image_size=256)
    _ensure_generation_config(model, processor)
    bundle = JanusBundle(model=model, processor=processor, fingerprint="tiny-256", source="tiny")
    ours = sample_images(bundle, PROMPTS[:2], greedy=True, batch_size=2).tokens
    assert ours.shape == (2, 256)
    for row, prompt in enumerate(PROMPTS[:2]):
        ids, mask = gen_prompt_batch(bundle, [prompt])
        ref = model.generate(input_ids=ids, attention_mask=mask, generation_mode="image", guidance_scale=5.0,
                             do_sample=False)
        assert torch.equal(ours[row], ref[0])
