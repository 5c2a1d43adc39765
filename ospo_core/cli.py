"""The `ospo` command line: run a round, inspect one, smoke-test a model, serve the Prefect UI and deployments.

Commands that need Prefect import it lazily, so `ospo_core` itself never depends on it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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


class ServeError(RuntimeError):
    """A process `ospo serve` started failed; printed as one line that says where its log is."""


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


def build_round_config(args: argparse.Namespace):
    """Preset, then --config file, then --model/--round, then each --set: validated once, at the end."""
    from ospo_core.config import PRESETS, RoundConfig, deep_update

    preset = args.preset or ("demo" if args.model == "tiny" else "paper")
    document = copy.deepcopy(PRESETS[preset])  # --set edits it in place: the preset itself must stay as it is
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
    return validated(RoundConfig, document, args.set, "round", "train.max_steps=20"), preset


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


# ---------------------------------------------------------------- ospo serve: server, pools, deployments, worker

REPO = Path(__file__).resolve().parent.parent  # the checkout: prefect.yaml and the flows' entrypoints live here
WORK_POOLS = {
    "ospo-cpu": "Process workers on CPU machines: the manual round (the tiny model demo, small jobs).",
    "ospo-gpu": "Process workers on GPU machines, one per GPU (CUDA_VISIBLE_DEVICES): nightly rounds, evaluation.",
}
GPU_SLOTS = "gpu"  # global concurrency limit the model stages take a slot of (tasks/stages.py), one at a time
IN_FLIGHT = ("PENDING", "RUNNING", "CANCELLING")


def _serve(args: argparse.Namespace) -> int:
    """Prefect server -> work pools + `gpu` limit -> `prefect deploy --all` -> worker(s); Ctrl-C stops them in order.

    The children run in their own sessions so that Ctrl-C reaches this process only and the shutdown keeps its
    order: runs in flight are cancelled while the server is still up, then the workers stop, then the server.
    """
    if not (REPO / "prefect.yaml").is_file():
        raise UsageError(f"{REPO} has no prefect.yaml: `ospo serve` runs from a checkout of the repository")
    address = f"http://{_client_host(args.host)}:{args.port}"
    api_url = f"{address}/api"
    if _healthy(api_url):
        raise UsageError(f"a server already answers at {address}; stop it or pass another --port")
    from ospo_core import store

    # the workers get the home resolved here, as `ospo run` would, not one relative to the checkout they chdir to
    home = Path(args.home).resolve() if args.home else store.ospo_home()
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_API_URL": api_url, "OSPO_REPO": str(REPO), "OSPO_HOME": str(home)}
    pools = ["ospo-cpu", "ospo-gpu"] if args.gpu_worker else ["ospo-cpu"]
    log_path = home / "serve" / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    prefect = [sys.executable, "-m", "prefect"]

    children: list[tuple[str, subprocess.Popen]] = []
    # Ctrl-C and `kill` both stop in order; SIGINT explicitly too, as a shell starting us in the background
    # would have us ignore it
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting the Prefect server on {address} (log: {log_path})", flush=True)
        with open(log_path, "ab") as log:
            server = subprocess.Popen([*prefect, "server", "start", "--host", args.host, "--port", str(args.port)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        children.append(("server", server))
        _wait_healthy(api_url, server, log_path)
        _provision(api_url)
        print("deploying prefect.yaml ...", flush=True)
        _deploy(prefect, env)
        for pool in pools:
            worker = subprocess.Popen([*prefect, "worker", "start", "--pool", pool, "--type", "process",
                                       "--name", f"{pool}-{socket.gethostname()}-{os.getpid()}"],
                                      env=env, cwd=REPO, start_new_session=True)
            children.append((f"{pool} worker", worker))
        print(f"\nPrefect UI: {address}\n"
              f"deployments: {', '.join(_deployment_names())}; worker(s) polling {', '.join(pools)}\n"
              f"use it from another shell with: export PREFECT_API_URL={api_url}\n"
              "Ctrl-C stops the workers and the server", flush=True)
        while True:
            for name, child in children:
                if child.poll() is not None:
                    where = f"; see {log_path}" if child is server else ""
                    raise ServeError(f"the {name} exited with status {child.returncode}{where}")
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        # the stop itself is bounded (cancel wait + one grace per child), so a second Ctrl-C cannot cut it short
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            if children and _healthy(api_url):
                _cancel_in_flight(api_url)
        finally:
            for name, child in reversed(children):
                _stop(child)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    print("stopped")
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _client_host(host: str) -> str:
    """The address a client on this machine dials for a server bound to `host`."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_healthy(api_url: str, server: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    """A fresh database is migrated on first start, so this may take a while; a dead server fails at once."""
    deadline = time.monotonic() + timeout
    while not _healthy(api_url):
        if server.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise ServeError(f"the Prefect server exited with status {server.returncode} before it answered "
                             f"(log {log_path}): {' | '.join(tail)}")
        if time.monotonic() > deadline:
            raise ServeError(f"the Prefect server did not answer at {api_url} within {timeout:.0f}s; see {log_path}")
        time.sleep(0.5)


def _provision(api_url: str) -> None:
    """Create the work pools and the `gpu` concurrency limit unless they exist (kept as they are when they do)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for name, description in WORK_POOLS.items():
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type="process", description=description,
                    base_job_template=ProcessWorker.get_default_base_job_template()))
                print(f"created work pool {name}")
            except ObjectAlreadyExists:
                pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_SLOTS, limit=1))
            print(f"created concurrency limit {GPU_SLOTS!r} (1 slot)")
        except ObjectAlreadyExists:
            pass


def _deploy(prefect: list[str], env: dict[str, str]) -> None:
    """`prefect deploy --all` from the checkout, as a user would type it (no prompts).

    Without OSPO_REPO: `prefect deploy` would bake its value into the pull step, and each worker must fill in its own.
    """
    deploy_env = {k: v for k, v in env.items() if k != "OSPO_REPO"} | {"PREFECT_CLI_PROMPT": "false"}
    done = subprocess.run([*prefect, "deploy", "--all"], cwd=REPO, env=deploy_env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise ServeError("`prefect deploy --all` failed:\n" + "\n".join(tail))


def _deployment_names() -> list[str]:
    import yaml

    return [d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]]


def _cancel_in_flight(api_url: str, timeout: float = 30) -> None:
    """Cancel every run in flight: none can finish without the server, and a cancelled flow-run process exits instead
    of outliving it (a rerun of the same round id resumes: finished stages are cached, finished shards kept)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterId, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    in_flight = FlowRunFilterState(type=FlowRunFilterStateType(any_=list(IN_FLIGHT)))
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=in_flight))
        for run in runs:
            print(f"cancelling flow run {run.name} ({run.id})", flush=True)
            client.set_flow_run_state(run.id, Cancelling(message="ospo serve is stopping"), force=True)
        ids = FlowRunFilterId(any_=[run.id for run in runs])
        deadline = time.monotonic() + timeout
        while runs and time.monotonic() < deadline:
            time.sleep(1)
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=ids, state=in_flight))
        for run in runs:
            print(f"flow run {run.name} ({run.id}) did not stop within {timeout:.0f}s", file=sys.stderr)


def _stop(child: subprocess.Popen, grace: float = 20) -> None:
    """SIGINT (Prefect's own graceful stop), then SIGKILL after `grace` seconds."""
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def build_eval_config(args: argparse.Namespace, tiny: bool):
    """--preset (demo for the tiny model: one image per prompt, structured question fallback), then --prompts,
    --limit, --images and each --set, validated once."""
    from ospo_core.config import EVAL_PRESETS, EvalConfig, deep_update

    preset = args.preset or ("demo" if tiny else "paper")
    document = deep_update({}, EVAL_PRESETS[preset])
    prompts = args.prompts
    if prompts not in ("t2i-compbench", "geneval"):
        if not Path(prompts).is_file():
            raise UsageError(f"--prompts {prompts}: not 't2i-compbench' or 'geneval', and no such file")
        prompts = str(Path(prompts).resolve())
    document["prompt_set"] = prompts
    if args.limit is not None:
        document["limit"] = args.limit
    if args.images is not None:
        document["images_per_prompt"] = args.images
    return validated(EvalConfig, document, args.set, "eval", "questions.fallback=structured"), preset


def _eval(args: argparse.Namespace) -> int:
    from ospo_core import store
    from ospo_core.evaluate import EvalMetrics, metrics_text
    from ospo_core.janus.load import check_model_source

    home = Path(args.home).resolve() if args.home else store.ospo_home()
    if args.round and args.model:
        raise UsageError("give --round (evaluate that round's trained model) or --model, not both")
    if args.start and not args.round:
        raise UsageError("--start evaluates the model a round started from: it needs --round")
    model = None if args.round else (args.model or "tiny")
    if args.round:
        path = store.round_dir(home, args.round)
        if not (path / "manifest.json").is_file():
            raise UsageError(f"no round {args.round!r} under {home / 'runs'}; `ospo rounds` lists the rounds")
        tiny = store.read_manifest(path)["model"]["source"] == "tiny"
    else:
        check_model_source(model)  # fail before anything is written
        tiny = model == "tiny"
        model = model if tiny else str(Path(model).resolve())
    config, preset = build_eval_config(args, tiny)
    what = f"round {args.round} ({'start' if args.start else 'trained'} model)" if args.round else model
    print(f"evaluating {what} on {config.prompt_set} (preset {preset}); artifacts under {home}")
    from flows.evaluate import ospo_evaluate

    t0 = time.perf_counter()
    result = ospo_evaluate(config, home=str(home), round_id=args.round, model=model, start_model=args.start)
    print(f"\n{metrics_text(EvalMetrics.model_validate(result['metrics']))}")
    print(f"\neval table: {result['eval']['path']} ({time.perf_counter() - t0:.0f}s)")
    print(f"plot across rounds: {result['plot']}")
    return 0


def _rounds(args: argparse.Namespace) -> int:
    """The lineage in registry order: what each round started from, its eval metric before -> after, the decision."""
    from ospo_core import store
    from ospo_core.evaluate import JUDGE_NOTE

    home = Path(args.home).resolve() if args.home else store.ospo_home()
    entries = store.list_entries(home)
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
        print(JUDGE_NOTE)
    return 0


# ---------------------------------------------------------------- ospo testbed: does a round make the model better?


def build_testbed_config(args: argparse.Namespace):
    """--rounds/--seeds/--settings/--judge, then each --set (keys of TestbedConfig, e.g. round.train.max_steps)."""
    from ospo_core.config import TestbedConfig

    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds}: need at least one seed")
    # A partial `round` changes the testbed preset (TestbedConfig merges it), so --set only names what it changes.
    document = {"rounds": args.rounds, "seeds": list(range(args.seeds)), "round": {"vqa": {"judge": args.judge}}}
    if args.settings:
        document["settings"] = args.settings.split(",")
    return validated(TestbedConfig, document, args.set, "testbed", "round.train.max_steps=20")


def _testbed(args: argparse.Namespace) -> int:
    import torch

    from ospo_core import store
    from ospo_core.testbed.ablation import run_testbed

    config = build_testbed_config(args)
    # The testbed model's matrices are tiny: one thread per process beats two threads that wait on each other.
    torch.set_num_threads(args.threads)
    home = Path(args.home).resolve() if args.home else store.ospo_home()
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
    run.add_argument("--model", default="tiny", help="'tiny' or a local Janus checkpoint folder")
    run.add_argument("--home", help="artifact root (default: $OSPO_HOME or ./.ospo)")
    run.add_argument("--config", help="YAML/JSON file with round settings (see ospo_core/config.py RoundConfig)")
    run.add_argument("--preset", choices=["demo", "paper", "testbed"],
                     help="starting settings: demo (minutes on a CPU) is the default for --model tiny, else paper; "
                          "testbed for a checkpoint made by `ospo testbed` (the shapes world)")
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

    serve = sub.add_parser("serve", help="start a Prefect server, deploy prefect.yaml, start a worker; print the UI "
                                         "address")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address the server binds (default 127.0.0.1: this machine only; 0.0.0.0 lets GPU "
                            "workers on other machines reach it, with no authentication)")
    serve.add_argument("--port", type=int, default=4200, help="server port (default 4200)")
    serve.add_argument("--home", help="artifact root of the runs this worker executes (default: $OSPO_HOME or "
                                      "./.ospo in the checkout)")
    serve.add_argument("--gpu-worker", action="store_true",
                       help="also start a worker for the ospo-gpu pool here (a GPU machine serving itself)")
    serve.set_defaults(func=_serve)

    evaluate = sub.add_parser("eval", help="evaluate a model or a round on held-out prompts (self-judged) and print "
                              "the per-category metrics")
    evaluate.add_argument("--model", help="'tiny' or a local Janus checkpoint folder (default: tiny, unless --round)")
    evaluate.add_argument("--round", help="evaluate this round's trained model (its start model with --start)")
    evaluate.add_argument("--start", action="store_true", help="with --round: the model the round started from")
    evaluate.add_argument("--home", help="artifact root (default: $OSPO_HOME or ./.ospo)")
    evaluate.add_argument("--prompts", required=True, metavar="t2i-compbench|geneval|FILE",
                          help="a shipped prompt set, or a file: one prompt per line, or JSONL with 'prompt'")
    evaluate.add_argument("--limit", type=int, help="first N prompts of each category")
    evaluate.add_argument("--images", type=int, help="images per prompt")
    evaluate.add_argument("--preset", choices=["demo", "paper"],
                          help="starting settings: demo (1 image per prompt, structured question fallback) is the "
                          "default for the tiny model, else paper")
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE",
                          help="override one setting of EvalConfig, e.g. --set seed=3 --set questions.fallback=none")
    evaluate.set_defaults(func=_eval)

    rounds = sub.add_parser("rounds", help="the lineage of rounds with eval metrics and promotion decisions")
    rounds.add_argument("--home", help="artifact root (default: $OSPO_HOME or ./.ospo)")
    rounds.set_defaults(func=_rounds)

    testbed = sub.add_parser("testbed", help="the ablation table on the shapes-world testbed: pre-train a tiny model, "
                             "run OSPO rounds per training setting, print held-out exact-scene accuracy")
    testbed.add_argument("--rounds", type=int, default=2, help="rounds per setting (default 2)")
    testbed.add_argument("--seeds", type=int, default=3, help="repeats of the table, seeds 0..N-1 (default 3)")
    testbed.add_argument("--settings", help="comma-separated subset of sft,simpo,simpo+sft,ospo,ospo+objw,dpo")
    testbed.add_argument("--judge", choices=["oracle", "self"], default="oracle",
                         help="who answers the self-VQA questions: the exact oracle (default) or the model itself")
    testbed.add_argument("--checkpoint", help="pre-trained testbed checkpoint folder: reused when it was made with "
                         "the same settings, created there otherwise (default: inside the run folder)")
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


if __name__ == "__main__":
    sys.exit(main())
