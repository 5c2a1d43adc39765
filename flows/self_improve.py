"""Self-improvement: N OSPO rounds in a row, round n+1 starting from the model round n produced.

Each round starts from the latest *promoted* model in the registry (base checkpoint + the adapters of every
promoted round, merged in order); with nothing promoted yet it starts from `config.round.model`. This is the flow
the nightly deployment runs.

Run it:
    prefect deployment run 'ospo-self-improve/ospo-nightly'      # what the schedule does
    python -c "from flows.self_improve import self_improve; self_improve()"
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task

from ospo_core import store
from ospo_core.config import SelfImproveConfig
from flows.round import ospo_round


@task(name="latest-promoted-model")
def latest_promoted_model(home: str | None, model: str, adapters: list[str]) -> tuple[str, list[str]]:
    """(base model, adapters in merge order) of the latest promoted round, or the configured start."""
    entry = store.latest_promoted(Path(home) if home else store.ospo_home())
    if entry is None:
        return model, list(adapters)
    return entry["model"], [*entry["adapters"], entry["adapter"]]


@flow(name="ospo-self-improve", validate_parameters=True)
def self_improve(config: SelfImproveConfig = SelfImproveConfig(), home: str | None = None) -> list[dict]:
    manifests = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, config.rounds + 1):
        model, adapters = latest_promoted_model(home, config.round.model, config.round.adapters)
        get_run_logger().info("round %d/%d starts from %s + %d adapter(s)", n, config.rounds, model, len(adapters))
        round_config = config.round.model_copy(
            update={"round_id": f"{config.round_prefix}-{stamp}-{n}", "model": model, "adapters": adapters}
        )
        manifests.append(ospo_round(round_config, home=home))
    return manifests
