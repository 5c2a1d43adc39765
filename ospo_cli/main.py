"""The `ospo` command line: run a round, inspect one, smoke-test a model, evaluate, serve the Prefect UI.

Commands that need Prefect or the flows import them lazily, so bad input is refused at once. Every failure a user
can fix is one line on stderr (what is wrong, which file, what to do) and exit status 2; SIGINT and SIGTERM stop a
command within seconds, with the Prefect run marked Crashed and the round lock released.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ospo_cli import ServeError, UsageError, writable_folder

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}


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


def validated(model_cls, document: dict, sets: list[str] | None, what: str, example: str):
    """Each --set key=value applied to `document`, then one validation whose error names every bad key."""
    from pydantic import ValidationError

    for item in sets or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected key=value, e.g. --set {example}")
        key, value = item.split("=", 1)
        set_path(document, key.strip(), parse_value(value))
    try:
        return model_cls.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"invalid {what} config: {problems}") from exc


def read_settings_file(path: Path) -> dict:
    """A --config file: YAML or JSON (JSON is YAML too), plain data only (`safe_load` refuses `!!python/...` tags)."""
    import yaml

    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"--config {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        # the first line names the problem (e.g. a `!!python/object` tag, which is never loaded); the rest is context
        problem = str(exc).strip().splitlines()[0].rstrip(":")
        raise UsageError(f"--config {path}: not a plain YAML/JSON file of round settings ({problem}); write "
                         "settings as plain keys and values") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path}: expected a mapping of round settings, e.g. `train: {{max_steps: 20}}`")
    return loaded


def home_of(args: argparse.Namespace) -> Path:
    from ospo_core import store

    return Path(args.home).resolve() if args.home else store.ospo_home()


def writable_home(args: argparse.Namespace) -> Path:
    return writable_folder(home_of(args), "artifact folder")


def round_manifest(home: Path, round_id: str, listing: str) -> dict:
    """The manifest of a finished or running round, or one UsageError line (bad id, no such round, garbage)."""
    from ospo_core import store

    try:
        path = store.round_dir(home, round_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not (path / "manifest.json").is_file():
        raise UsageError(f"no round {round_id!r} under {home / 'runs'}; {listing} lists the rounds")
    try:
        manifest = store.read_manifest(path)
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{path / 'manifest.json'} cannot be read ({exc}); restore it, or delete the round "
                         "folder and run the round again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("round_id"), str):
        raise UsageError(f"{path / 'manifest.json'} is not a round manifest (no round_id); restore it, or delete "
                         "the round folder and run the round again")
    return manifest


def build_round_config(args: argparse.Namespace):
    """Preset, then --config file, then --model/--round, then each --set: validated once, at the end."""
    from ospo_core.config import PRESETS, RoundConfig, deep_update

    preset = args.preset or {"tiny": "demo", "testbed": "testbed-demo"}.get(args.model, "paper")
    document = copy.deepcopy(PRESETS[preset])  # --set edits it in place: the preset itself must stay as it is
    if args.config:
        document = deep_update(document, read_settings_file(Path(args.config)))
    document["model"] = args.model
    if args.model == "testbed":  # the shipped start model of the shapes-world testbed
        from ospo_core.testbed.pretrain import SHIPPED

        document["model"] = str(SHIPPED)
    if args.round:
        document["round_id"] = args.round
    return validated(RoundConfig, document, args.set, "round", "train.max_steps=20"), preset


# ---------------------------------------------------------------- commands


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM. A KeyboardInterrupt, so Prefect's engine records the run as Crashed on its way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


@contextmanager
def interruptible():
    """SIGTERM stops the command as Ctrl-C does; SIGINT explicitly too, as a shell starting us in the background
    would have us ignore it. The temporary server is stopped and the round lock released as the exception leaves."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def prefect_api():
    """The API the flows report to: PREFECT_API_URL when one is set, else a temporary server of our own that stays
    up until the flow has recorded how it ended (ospo_cli/server.py)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from ospo_cli.server import temporary_server

    if PREFECT_API_URL.value():
        yield
        return
    with temporary_server() as settings, temporary_settings(updates={
            PREFECT_API_URL: settings["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: settings["PREFECT_API_AUTH_STRING"]}):
        try:
            yield
        finally:
            # the run's last logs and events go out while the server still answers (as prefect_test_harness does)
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
            EventsWorker.drain_all(timeout=5)


def _run(args: argparse.Namespace) -> int:
    from ospo_core import store
    from ospo_core.janus.load import check_model_source

    config, preset = build_round_config(args)
    check_model_source(config.model)  # fail before anything is written
    home = writable_home(args)
    if config.round_id:
        # refused here in one line rather than inside the flow; the flow runs in this process, so its own
        # lock_round finds the lock held and close_round releases it
        try:
            store.lock_round(store.round_dir(home, config.round_id))
        except store.RoundBusyError as exc:
            raise UsageError(str(exc)) from None
    print(f"OSPO round on {config.model} (preset {preset}); artifacts under {home}", flush=True)
    from ospo_core.estimate import round_estimate

    print(round_estimate(config), flush=True)
    with interruptible(), prefect_api():
        from flows.round import ospo_round

        t0 = time.perf_counter()
        manifest = ospo_round(config, home=str(home))
    print_summary(manifest, time.perf_counter() - t0)
    if config.world == "shapes" and manifest.get("adapter"):
        from ospo_core.testbed.evaluate import before_after, before_after_table

        before, after = before_after(config.model, config.adapters, manifest["adapter"], config.render)
        print(f"\nheld-out exact-scene accuracy (the shapes world's oracle; the round was judged by "
              f"{config.vqa.judge}):\n{before_after_table(before, after)}")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from ospo_core.estimate import estimate, model_size, table

    config, _ = build_round_config(args)
    try:
        size = args.model_size or model_size(config.model)
        print(table(estimate(config, size=size, device=args.device, gpus=args.gpus)))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
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

    home = home_of(args)
    manifest = round_manifest(home, args.round, f"`ls {home / 'runs'}`")
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


def build_eval_config(args: argparse.Namespace, tiny: bool):
    """--preset (demo for the tiny model: one image per prompt, structured question fallback), then --prompts,
    --limit, --images and each --set, validated once."""
    from ospo_core.config import EVAL_PRESETS, EvalConfig, deep_update
    from ospo_core.evaluate import SHIPPED_SETS, load_prompt_set

    preset = args.preset or ("demo" if tiny else "paper")
    document = deep_update({}, EVAL_PRESETS[preset])
    prompts = args.prompts
    if prompts not in SHIPPED_SETS:
        if not Path(prompts).is_file():
            raise UsageError(f"--prompts {prompts}: not one of {', '.join(SHIPPED_SETS)}, and no such file")
        prompts = str(Path(prompts).resolve())
        # read now, before a server starts or a model loads, so a bad file is one line, not a failed flow
        try:
            load_prompt_set(prompts)
        except UnicodeDecodeError as exc:
            raise UsageError(f"--prompts {prompts}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                             f"{exc.start}); save it as UTF-8") from None
        except ValueError as exc:
            raise UsageError(f"--prompts {prompts}: {exc}") from None
    document["prompt_set"] = prompts
    if args.limit is not None:
        document["limit"] = args.limit
    if args.images is not None:
        document["images_per_prompt"] = args.images
    if args.judge is not None:
        document["judge"] = args.judge
    if args.judge_model is not None:
        if args.judge_model != "tiny" and not Path(args.judge_model).is_dir():
            raise UsageError(f"--judge-model {args.judge_model}: no such folder; give the local folder of the judge's "
                             f"weights (README: Judges)")
        document["judge_model"] = args.judge_model if args.judge_model == "tiny" else str(
            Path(args.judge_model).resolve())
    return validated(EvalConfig, document, args.set, "eval", "questions.fallback=structured"), preset


def _eval(args: argparse.Namespace) -> int:
    from ospo_core import store
    from ospo_core.evaluate import EvalMetrics, metrics_text
    from ospo_core.janus.load import check_model_source

    home = home_of(args)
    if args.round and args.model:
        raise UsageError("give --round (evaluate that round's trained model) or --model, not both")
    if args.start and not args.round:
        raise UsageError("--start evaluates the model a round started from: it needs --round")
    model = None if args.round else (args.model or "tiny")
    if args.round:
        tiny = round_manifest(home, args.round, "`ospo rounds`").get("model", {}).get("source") == "tiny"
    else:
        check_model_source(model)  # fail before anything is written
        tiny = model == "tiny"
        model = model if tiny else str(Path(model).resolve())
    config, preset = build_eval_config(args, tiny)
    writable_home(args)
    what = f"round {args.round} ({'start' if args.start else 'trained'} model)" if args.round else model
    print(f"evaluating {what} on {config.prompt_set} (preset {preset}); artifacts under {home}")
    with interruptible(), prefect_api():
        from flows.evaluate import ospo_evaluate

        t0 = time.perf_counter()
        result = ospo_evaluate(config, home=str(home), round_id=args.round, model=model, start_model=args.start)
    print(f"\n{metrics_text(EvalMetrics.model_validate(result['metrics']))}")
    print(f"\neval table: {result['eval']['path']} ({time.perf_counter() - t0:.0f}s)")
    print(f"plot across rounds: {result['plot']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ospo_cli.serve import serve

    return serve(args.host, args.port, home_of(args), args.gpu_worker, OFFLINE_ENV)


def _rounds(args: argparse.Namespace) -> int:
    """The lineage in registry order: what each round started from, its eval metric before -> after, the decision."""
    from ospo_core import store

    home = home_of(args)
    if args.rebuild:
        rebuilt = store.rebuild_registry(home)
        print(f"rebuilt {home / 'models' / 'registry.json'} from {len(rebuilt)} round manifest(s): "
              f"{', '.join(e['round_id'] for e in rebuilt) or '-'}\n")
    try:
        entries = store.list_entries(home)
    except ValueError as exc:  # a registry that is not JSON
        raise UsageError(f"{exc}; or `ospo rounds --rebuild` rebuilds it from the round manifests") from None
    if not entries:
        print(f"no rounds registered under {home} (`ospo run` or the self-improvement flow registers them)")
        return 0
    by_fingerprint = {e["fingerprint"]: e["round_id"] for e in entries}
    print(f"{'round':<30}{'from':<30}{'adapters':>9}  {'promoted':<9}{'eval (metric: before -> after)':<40}decision")
    for e in entries:
        start = by_fingerprint.get(e["trained_from"], f"{e['model']} {e['trained_from'][:8]}")
        gate = e.get("gate")
        metric = "-"
        if gate:
            before, after = (f"{v:.4f}" if v is not None else "-" for v in (gate["before"], gate["after"]))
            metric = f"{e['metrics']['eval']['prompt_set']} {gate['metric']}: {before} -> {after}"
        print(f"{e['round_id']:<30}{start:<30}{len(e['adapters']) + 1:>9}  {'yes' if e['promoted'] else 'no':<9}"
              f"{metric:<40}{e.get('decision', '-')}")
    latest = store.latest_promoted(home)
    print(f"\nnext round starts from: {latest['round_id'] if latest else 'the base model (nothing promoted yet)'}")
    if any(e.get("gate") for e in entries):
        print(next(e["metrics"]["eval"]["judge"] for e in reversed(entries) if e.get("gate")))
    return 0


# ---------------------------------------------------------------- ospo testbed: does a round make the model better?


def build_testbed_config(args: argparse.Namespace):
    """--rounds/--seeds/--settings/--judge, then each --set (keys of TestbedConfig, e.g. round.train.max_steps)."""
    from ospo_core.config import TestbedConfig

    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds}: need at least one seed")
    # A partial `round` changes the testbed preset (TestbedConfig merges it), so --set only names what it changes.
    judges = {"oracle": ["oracle"], "self": ["self_grid"], "both": ["oracle", "self_grid"]}[args.judge]
    document = {"rounds": args.rounds, "seeds": list(range(args.seeds)), "judges": judges}
    if args.settings:
        document["settings"] = args.settings.split(",")
    return validated(TestbedConfig, document, args.set, "testbed", "round.train.max_steps=20")


def _testbed(args: argparse.Namespace) -> int:
    import torch

    from ospo_core.testbed.ablation import run_testbed

    config = build_testbed_config(args)
    # The testbed model's matrices are tiny: one thread per process beats two threads that wait on each other.
    torch.set_num_threads(args.threads)
    if args.build_checkpoint:
        from ospo_core.testbed.pretrain import pretrain

        folder = Path(args.build_checkpoint)
        if folder.exists() and any(folder.iterdir()):
            raise UsageError(f"--build-checkpoint {folder}: the folder is not empty; pass a new or empty folder")
        pretrain(config.pretrain, folder)
        print(f"testbed start checkpoint written to {folder}")
        return 0
    home = home_of(args)
    checkpoint = Path(args.checkpoint).resolve() if args.checkpoint else None
    try:
        run_dir, table = run_testbed(config, home, checkpoint)
    except ValueError as exc:  # a --checkpoint folder that holds something else
        raise UsageError(str(exc)) from exc
    print(f"\n{table}\n\nrun folder: {run_dir} (results.md, results.json, ablation.png, samples.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ospo", description="OSPO self-improvement rounds for Janus-Pro")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one full OSPO round in-process (no server needed) and print a summary")
    run.add_argument("--model", default="tiny", help="'tiny', 'testbed' (the shipped shapes-world start model) or a "
                     "local Janus checkpoint folder")
    run.add_argument("--home", help="artifact root (default: $OSPO_HOME or ./.ospo)")
    run.add_argument("--config", help="YAML/JSON file with round settings (see ospo_core/config.py RoundConfig)")
    run.add_argument("--preset", choices=["demo", "paper", "v3", "testbed", "testbed-demo"],
                     help="starting settings: demo (minutes on a CPU) is the default for --model tiny, testbed-demo "
                          "(the model judges its own drawings) for --model testbed, else paper; v3 the authors' 2026 "
                          "settings (object masks); testbed (oracle judge) for a checkpoint made by `ospo testbed`")
    run.add_argument("--round", help="round id; reuse one to resume a round (finished stages and shards are kept)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override one setting, e.g. --set train.max_steps=20 --set select.rule=v3")
    run.set_defaults(func=_run)

    est = sub.add_parser("estimate", help="projected wall time of each stage and of a round on a device, from the "
                         "benchmarks' device profiles; ends with 'total: <hours> h'")
    est.add_argument("--preset", choices=["demo", "paper", "testbed", "testbed-demo"], default="paper")
    est.add_argument("--model", default="tiny", help="the round's model ('tiny' or a checkpoint folder, sized from "
                     "its config.json unless --model-size is given)")
    est.add_argument("--model-size", choices=["tiny", "mid", "1b", "7b"], help="model shape to estimate for")
    est.add_argument("--device", default="cpu", help="device profile (ospo_core/data/profiles/NAME.json), e.g. h200")
    est.add_argument("--gpus", type=int, default=1, help="devices: stages shard over them, training is data-parallel")
    est.add_argument("--config", help="YAML/JSON file with round settings")
    est.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting")
    est.set_defaults(func=_estimate, round=None)

    inspect = sub.add_parser("inspect", help="counts, rejections, sample rows and training metrics of a round")
    inspect.add_argument("round", help="round id (a folder under OSPO_HOME/runs)")
    inspect.add_argument("--home", help="artifact root (default: $OSPO_HOME or ./.ospo)")
    inspect.add_argument("--samples", type=int, default=3, help="sample rows per table")
    inspect.set_defaults(func=_inspect)

    smoke = sub.add_parser("smoke", help="run each model-layer function once on a model and print what it did")
    smoke.add_argument("--model", default="tiny", help="'tiny' or a local Janus checkpoint folder")
    smoke.set_defaults(func=_smoke)

    serve = sub.add_parser("serve", help="start a Prefect server, deploy prefect.yaml, start a worker; print the UI "
                                         "address")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address the server binds (default 127.0.0.1: this machine only; 0.0.0.0 lets GPU "
                            "workers on other machines reach it, with the auth string it prints)")
    serve.add_argument("--port", type=int, default=4200, help="server port (default 4200)")
    serve.add_argument("--home", help="artifact root of the runs this worker executes (default: $OSPO_HOME or "
                                      "./.ospo in the checkout)")
    serve.add_argument("--gpu-worker", action="store_true",
                       help="also start a worker for the ospo-gpu pool here (a GPU machine serving itself)")
    serve.set_defaults(func=_serve)

    evaluate = sub.add_parser("eval", help="evaluate a model or a round on held-out prompts under a judge and print "
                              "the per-category metrics")
    evaluate.add_argument("--model", help="'tiny' or a local Janus checkpoint folder (default: tiny, unless --round)")
    evaluate.add_argument("--round", help="evaluate this round's trained model (its start model with --start)")
    evaluate.add_argument("--start", action="store_true", help="with --round: the model the round started from")
    evaluate.add_argument("--home", help="artifact root (default: $OSPO_HOME or ./.ospo)")
    evaluate.add_argument("--prompts", required=True, metavar="t2i-compbench|geneval|FILE",
                          help="a shipped prompt set, or a file: one prompt per line, or JSONL with 'prompt'")
    evaluate.add_argument("--limit", type=int, help="first N prompts of each category")
    evaluate.add_argument("--judge", choices=["fixed", "self", "geneval", "vqa"],
                          help="who answers the questions (default fixed: a round's start model, or the model itself)")
    evaluate.add_argument("--judge-model", metavar="DIR",
                          help="the judge's local weights: a Janus folder (fixed), a folder with detector/ and clip/ "
                               "(geneval) or with vqa/ and clip/ (vqa)")
    evaluate.add_argument("--images", type=int, help="images per prompt")
    evaluate.add_argument("--preset", choices=["demo", "paper"],
                          help="starting settings: demo (1 image per prompt, structured question fallback) is the "
                          "default for the tiny model, else paper")
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE",
                          help="override one setting of EvalConfig, e.g. --set seed=3 --set questions.fallback=none")
    evaluate.set_defaults(func=_eval)

    rounds = sub.add_parser("rounds", help="the lineage of rounds with eval metrics and promotion decisions")
    rounds.add_argument("--home", help="artifact root (default: $OSPO_HOME or ./.ospo)")
    rounds.add_argument("--rebuild", action="store_true",
                        help="rebuild models/registry.json from the round manifests first (a lost or damaged registry)")
    rounds.set_defaults(func=_rounds)

    testbed = sub.add_parser("testbed", help="the ablation table on the shapes-world testbed: pre-train a tiny model, "
                             "run OSPO rounds per training setting, print held-out exact-scene accuracy")
    testbed.add_argument("--rounds", type=int, default=4, help="rounds per setting (default 4)")
    testbed.add_argument("--seeds", type=int, default=3, help="repeats of the table, seeds 0..N-1 (default 3)")
    testbed.add_argument("--settings", help="comma-separated subset of sft,simpo,simpo+sft,ospo,ospo+objw,dpo")
    testbed.add_argument("--judge", choices=["oracle", "self", "both"], default="both",
                         help="who answers the self-VQA questions: the exact oracle, the model itself (judging its "
                              "own drawings), or both side by side (default)")
    testbed.add_argument("--checkpoint", help="pre-trained testbed checkpoint folder: reused when it was made with "
                         "the same settings, created there otherwise (default: the shipped start model when the "
                         "pre-training settings are the defaults, else inside the run folder)")
    testbed.add_argument("--build-checkpoint", metavar="DIR",
                         help="only pre-train a start model into the new folder DIR (deterministic with --threads 1; "
                              "the shipped one is `--build-checkpoint ospo_core/data/testbed`) and exit")
    testbed.add_argument("--home", help="artifact root (default: $OSPO_HOME or ./.ospo)")
    testbed.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    testbed.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override a TestbedConfig setting, e.g. --set pretrain.steps=500 "
                              "--set round.train.learning_rate=1e-4 --set eval_samples=32")
    testbed.set_defaults(func=_testbed)
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    from ospo_core.janus.load import ModelLoadError

    try:
        return args.func(args)
    except (UsageError, ModelLoadError, ServeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"stopped by {signal.Signals(signum).name}: the Prefect run is marked Crashed; the same command "
              "with the same --round resumes a round (finished stages and shards are kept)", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
