"""Files a user hands over cannot be trusted: a checkpoint folder never runs its own code, never asks a question on
the terminal, and a weights file that is a device or a fifo is refused at once instead of hanging the loader."""

import ast
import json
import logging
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from ospo_core.janus.load import ModelLoadError, load_janus, merged_fingerprint, save_janus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    return save_janus(tiny, tmp_path_factory.mktemp("untrusted") / "ckpt")


@pytest.fixture
def folder(checkpoint, tmp_path):
    """A private copy of the tiny checkpoint that a test may tamper with."""
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a blocked open() of a fifo or an endless read."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _plant_custom_code(folder: Path, marker: Path, tokenizer_class: str | None) -> None:
    """An `auto_map` in tokenizer_config.json pointing at a Python file of the folder that leaves `marker` when it
    is imported; `tokenizer_class` None keeps the folder's own (transformers) class name."""
    (folder / "evil_tokenizer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    if tokenizer_class is not None:
        config["tokenizer_class"] = tokenizer_class
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture
def no_prompt(monkeypatch):
    """transformers asks 'Do you wish to run the custom code? [y/N]' through input(): any question fails the test."""
    monkeypatch.setattr("builtins.input", lambda *args: pytest.fail(f"the loader asked the user: {args}"))


def test_custom_tokenizer_class_is_refused_without_running_or_asking(folder, tmp_path, no_prompt):
    marker = tmp_path / "code-ran"
    _plant_custom_code(folder, marker, tokenizer_class="EvilTokenizer")
    with pytest.raises(ModelLoadError) as caught:
        load_janus(folder, device="cpu")
    message = str(caught.value)
    assert "tokenizer_config.json" in message and "auto_map" in message and "\n" not in message
    assert not marker.exists()


def test_auto_map_beside_a_transformers_class_loads_safely_and_says_so(folder, tmp_path, no_prompt, tiny, caplog):
    marker = tmp_path / "code-ran"
    _plant_custom_code(folder, marker, tokenizer_class=None)
    with caplog.at_level(logging.WARNING, logger="ospo.load"):
        bundle = load_janus(folder, device="cpu")
    assert not marker.exists()
    assert type(bundle.tokenizer).__module__.startswith("transformers.")
    assert bundle.tokenizer("a red apple")["input_ids"] == tiny.tokenizer("a red apple")["input_ids"]
    assert "ignored 'auto_map' in tokenizer_config.json" in caplog.text


def test_every_from_pretrained_in_the_project_refuses_remote_code():
    """Beside the behaviour tests above: a loader added later must say trust_remote_code=False too (PEFT adapters
    hold weights and a config only, so PeftModel.from_pretrained has no such switch)."""
    calls = []
    for path in [p for d in ("ospo_core", "tasks", "flows", "bench") for p in (REPO / d).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "from_pretrained" and ast.unparse(node.func.value) != "PeftModel":
                calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
                flags = [k.value for k in node.keywords if k.arg == "trust_remote_code"]
                assert len(flags) == 1 and isinstance(flags[0], ast.Constant) and flags[0].value is False, calls[-1]
    assert len(calls) >= 3  # the model, the tokenizer and the image processor of load.py


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_weights_that_are_not_regular_files_are_refused_at_once(folder, kind):
    weights = folder / "model.safetensors"
    weights.unlink()
    if kind == "fifo":
        os.mkfifo(weights)
    else:
        weights.symlink_to("/dev/zero")
    with deadline(20), pytest.raises(ModelLoadError, match="model.safetensors is not a regular file") as caught:
        load_janus(folder, device="cpu")
    assert "\n" not in str(caught.value)


def test_an_adapter_whose_weights_are_a_device_is_refused(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").symlink_to("/dev/zero")
    with deadline(20), pytest.raises(ModelLoadError, match="not a regular file"):
        merged_fingerprint("base", adapter)
