"""The `ospo` command line: run a round, inspect one, smoke-test a model.

Commands that need Prefect import it lazily, so `ospo_core` itself never depends on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit status 2, nothing written."""


# ---------------------------------------------------------------- config from the command line


def parse_value(text: str):
    """`--set` values are JSON when they parse as JSON (numbers, booleans, lists, objects), else plain strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_path(document: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = document
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UsageError(f"--set {dotted}: '{key}' is not a section of the round config")
    node[keys[-1]] = value


def build_round_config(args: argparse.Namespace):
    """Preset, then --config file, then --model/--round, then each --set: validated once, at the end."""
    from pydantic import ValidationError

    from ospo_core.config import PRESETS, RoundConfig, deep_update

    preset = args.preset or ("demo" if args.model == "tiny" else "paper")
    document = deep_update({}, PRESETS[preset])
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        import yaml  # JSON is YAML too

        loaded = yaml.safe_load(path.read_text())
        if not isinstance(loaded, dict):
            raise UsageError(f"--config {path}: expected a mapping of round settings")
        document = deep_update(document, loaded)
    document["model"] = args.model
    if args.round:
        document["round_id"] = args.round
    for item in args.set or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected key=value, e.g. --set train.max_steps=20")
        key, value = item.split("=", 1)
        set_path(document, key.strip(), parse_value(value))
    try:
        return RoundConfig.model_validate(document), preset
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"invalid round config: {problems}") from exc


# ---------------------------------------------------------------- commands


def _run(args: argparse.Namespace) -> int:
    from ospo_core.janus.load import check_model_source

    config, preset = build_round_config(args)
    check_model_source(config.model)  # fail before anything is written
    home = str(Path(args.home).resolve()) if args.home else None
    print(f"OSPO round on {config.model} (preset {preset}); artifacts under {home or '$OSPO_HOME or ./.ospo'}")
    from flows.round import ospo_round

    t0 = time.perf_counter()
    manifest = ospo_round(config, home=home)
    print_summary(manifest, time.perf_counter() - t0)
    return 0


def print_summary(manifest: dict, seconds: float | None = None) -> None:
    took = f" in {seconds:.0f}s" if seconds is not None else ""
    print(f"\nround {manifest['round_id']} {manifest.get('status', '')}{took}: {manifest['path']}")
    print(f"{'table':<14}{'rows':>8}{'ok':>8}  rejected")
    for name, info in manifest.get("tables", {}).items():
        c = info["counts"]
        rejected = ", ".join(f"{k.split(':', 1)[1]}={v}" for k, v in c.items() if k.startswith("rejected:"))
        print(f"{name:<14}{c['rows']:>8}{c.get('ok', ''):>8}  {rejected or '-'}")
    training = manifest.get("training", {})
    keys = ["loss", "rewards/margins", "rewards/conditional_margin", "nll/chosen", "train_runtime"]
    if training:
        print("training (last logged): " + ", ".join(f"{k}={training[k]:.4g}" for k in keys if k in training))
    print(f"adapter: {manifest.get('adapter')}")
    if manifest.get("contact_sheet"):
        print(f"contact sheet: {manifest['contact_sheet']}")


def _inspect(args: argparse.Namespace) -> int:
    from ospo_core import store
    from ospo_core.records import SCHEMAS

    home = Path(args.home).resolve() if args.home else store.ospo_home()
    path = store.round_dir(home, args.round)
    if not (path / "manifest.json").is_file():
        raise UsageError(f"no round {args.round!r} under {home / 'runs'}; `ls {home / 'runs'}` lists the rounds")
    manifest = store.read_manifest(path)
    print_summary(manifest)
    for name, info in manifest.get("tables", {}).items():
        if name == "train_history":
            continue
        table = store.read_table(Path(info["path"]), SCHEMAS[name], name=name)
        print(f"\n{name}: first {min(args.samples, table.num_rows)} of {table.num_rows} rows")
        for row in table.slice(0, args.samples).to_pylist():
            shown = {k: v for k, v in row.items() if v is not None and k not in
                     ("image", "chosen", "rejected", "image_tokens", "chosen_tokens", "rejected_tokens", "mask")}
            print("  " + json.dumps(shown, ensure_ascii=False, default=str)[:300])
    return 0


def _smoke(args: argparse.Namespace) -> int:
    """Exercise every entry point of the model layer once and say what happened."""
    from ospo_core.janus.chat import few_shot_chat
    from ospo_core.janus.image import sample_images
    from ospo_core.janus.load import load_janus
    from ospo_core.janus.score import encode_images, image_logprobs, score_yes_no
    from ospo_core.janus.text import generate_text

    t0 = time.perf_counter()
    bundle = load_janus(args.model)
    print(f"loaded {bundle.source} on {bundle.device} ({bundle.dtype}), fingerprint {bundle.fingerprint}, "
          f"{sum(p.numel() for p in bundle.model.parameters()):,} parameters, {bundle.num_image_tokens} image tokens")
    chat = few_shot_chat("You write short image prompts.", [], "Write one prompt about a red apple.")
    text = generate_text(bundle, [chat], seed=0, max_new_tokens=16)[0]
    print(f"generate_text -> {text!r}")
    prompts = ["a red apple on a wooden table", "two cats to the left of a dog"]
    samples = sample_images(bundle, prompts, seed=[0, 1])
    print(f"sample_images -> tokens {tuple(samples.tokens.shape)}, images {[im.size for im in samples.images]}")
    scores = score_yes_no(bundle, samples.images, [["Is there a red apple?"], ["Are there two cats?", "Is there a dog?"]])
    print(f"score_yes_no -> {[[(round(y, 4), round(n, 4)) for y, n in row] for row in scores]}")
    _, mean = image_logprobs(bundle, prompts, samples.tokens)
    print(f"image_logprobs -> mean log-likelihood per image {[round(v, 4) for v in mean.tolist()]}")
    print(f"encode_images -> {tuple(encode_images(bundle, samples.images).shape)}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ospo", description="OSPO self-improvement rounds for Janus-Pro")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one full OSPO round in-process (no server needed) and print a summary")
    run.add_argument("--model", default="tiny", help="'tiny' or a local Janus checkpoint folder")
    run.add_argument("--home", help="artifact root (default: $OSPO_HOME or ./.ospo)")
    run.add_argument("--config", help="YAML/JSON file with round settings (see ospo_core/config.py RoundConfig)")
    run.add_argument("--preset", choices=["demo", "paper"],
                     help="starting settings: demo (minutes on a CPU) is the default for --model tiny, else paper")
    run.add_argument("--round", help="round id; reuse one to resume a round (finished stages and shards are kept)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override one setting, e.g. --set train.max_steps=20 --set select.rule=v3")
    run.set_defaults(func=_run)

    inspect = sub.add_parser("inspect", help="counts, rejections, sample rows and training metrics of a round")
    inspect.add_argument("round", help="round id (a folder under OSPO_HOME/runs)")
    inspect.add_argument("--home", help="artifact root (default: $OSPO_HOME or ./.ospo)")
    inspect.add_argument("--samples", type=int, default=3, help="sample rows per table")
    inspect.set_defaults(func=_inspect)

    smoke = sub.add_parser("smoke", help="run each model-layer function once on a model and print what it did")
    smoke.add_argument("--model", default="tiny", help="'tiny' or a local Janus checkpoint folder")
    smoke.set_defaults(func=_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    from ospo_core.janus.load import ModelLoadError

    try:
        return args.func(args)
    except (UsageError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
