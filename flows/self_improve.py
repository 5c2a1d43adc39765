"""Self-improvement: N OSPO rounds in a row, round n+1 starting from the model round n produced.

Lineage (`config.lineage`): latest (the paper) starts each round from the last registered round's trained model,
promoted or not; promoted starts from the latest *promoted* model (base checkpoint + the adapters of every promoted
round, merged in order). With no round yet it starts from `config.round.model`. This is the flow the nightly
deployment runs.

After training, a round is evaluated on held-out prompts twice, on the same prompts, seeds and questions: its start
model and its trained model (`flows/evaluate.py`), both judged by `config.eval.judge`: by default the fixed judge,
the round's start model, which training cannot teach to say yes. The trained model's images are also judged by the
trained model itself; the difference is reported as judge drift. The promotion gate (`config.gate`) promotes the
round only when the chosen metric rose by at least the threshold and no category fell by more than the tolerance;
otherwise the round is kept (folder, adapter, registry entry with the reason).

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
def latest_promoted_model(home: str | None, model: str, adapters: list[str],
                          lineage: str = "promoted") -> tuple[str, list[str]]:
    """(base model, adapters in merge order) a new round starts from: the latest promoted round's model
    (lineage "promoted") or the latest registered round's (lineage "latest"), or the configured start."""
    home_path = Path(home) if home else store.ospo_home()
    if lineage == "latest":
        entries = store.list_entries(home_path)
        entry = entries[-1] if entries else None
    else:
        entry = store.latest_promoted(home_path)
    if entry is None:
        return model, list(adapters)
    return entry["model"], [*entry["adapters"], entry["adapter"]]


@task(name="prune-old-rounds")
def prune_old_rounds(home: str | None, keep_last: int) -> list[str]:
    pruned = store.prune_rounds(Path(home) if home else store.ospo_home(), keep_last)
    if pruned:
        get_run_logger().info("retention (keep_last=%d): pruned %s", keep_last, ", ".join(pruned))
    return pruned


@flow(name="ospo-self-improve", validate_parameters=True)
def self_improve(config: SelfImproveConfig = SelfImproveConfig(), home: str | None = None) -> list[dict]:
    manifests = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, config.rounds + 1):
        model, adapters = latest_promoted_model(home, config.round.model, config.round.adapters, config.lineage)
        get_run_logger().info("round %d/%d starts from %s + %d adapter(s)", n, config.rounds, model, len(adapters))
        round_id = f"{config.round_prefix}-{stamp}-{n}"
        round_config = config.round.model_copy(update={"round_id": round_id, "model": model, "adapters": adapters})
        # The round registers its adapter unpromoted; the gate decides once both evaluations are in.
        manifest = ospo_round(round_config, home=home, promote=False)

        # Held-out evaluation of the start model and the trained model: same prompts, seeds, questions and judge;
        # the trained model's images are also judged by itself (judge drift).
        before = ospo_evaluate(config.eval, home=home, round_id=round_id, start_model=True)
        after = ospo_evaluate(config.eval, home=home, round_id=round_id, rejudge_self=True)

        # Promotion gate: promoted only if it got better under the judge and no category got worse.
        entry = promotion_gate(home, round_id, config.gate, before, after, config.eval.judge)
        manifests.append({**manifest, "promoted": entry["promoted"], "decision": entry["decision"]})

        # Retention: old round folders go once the decision is recorded; promoted lineages always stay.
        if config.keep_last is not None:
            prune_old_rounds(home, config.keep_last)
    return manifests
