"""Self-improvement: N OSPO rounds in a row, round n+1 starting from the model round n produced.

Each round starts from the latest *promoted* model in the registry (base checkpoint + the adapters of every
promoted round, merged in order); with nothing promoted yet it starts from `config.round.model`. This is the flow
the nightly deployment runs.

After training, a round is evaluated on held-out prompts twice, on the same prompts, seeds and questions: its start
model and its trained model (`flows/evaluate.py`, judged by the models themselves). The promotion gate
(`config.gate`) promotes it only when the chosen metric rose by at least the threshold and no category fell by more
than the tolerance; otherwise the round is kept (folder, adapter, registry entry with the reason) but the next
round starts again from the last promoted model.

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
from flows.evaluate import ospo_evaluate
from flows.round import ospo_round
from tasks.evaluate import promotion_gate


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
        round_id = f"{config.round_prefix}-{stamp}-{n}"
        round_config = config.round.model_copy(update={"round_id": round_id, "model": model, "adapters": adapters})
        # The round registers its adapter unpromoted; the gate decides once both evaluations are in.
        manifest = ospo_round(round_config, home=home, promote=False)

        # Held-out evaluation of the start model and the trained model: same prompts, seeds and questions.
        before = ospo_evaluate(config.eval, home=home, round_id=round_id, start_model=True)
        after = ospo_evaluate(config.eval, home=home, round_id=round_id)

        # Promotion gate: the next round starts from this model only if it got better and no category got worse.
        entry = promotion_gate(home, round_id, config.gate, before, after)
        manifests.append({**manifest, "promoted": entry["promoted"], "decision": entry["decision"]})
    return manifests
