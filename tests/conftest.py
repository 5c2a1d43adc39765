"""Shared fixtures. The offline environment is set before anything imports transformers/datasets/prefect."""

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny Janus on CPU (session-wide: tests must not mutate its weights)."""
    from ospo_core.janus.load import load_janus

    return load_janus("tiny", device="cpu")


@pytest.fixture(scope="session")
def prefect():
    """One temporary Prefect server (test harness) for the whole session: it takes ~10 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield
