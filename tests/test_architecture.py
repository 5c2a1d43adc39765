"""The house rules that keep the code readable: the method core never imports the orchestration, no module
imports another that imports it back, and a new stage is one declaration that runs in a round through Prefect."""

import ast
import sys
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from ospo_core.config import StageConfig

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("ospo_core", "tasks", "flows", "ospo_cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (inside functions too), except under `if TYPE_CHECKING`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()

    def visit(node, package: str):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child, package)

    name = module_name(path)
    visit(tree, name if path.name == "__init__.py" else name.rsplit(".", 1)[0])
    return found


def project_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_method_core_never_imports_the_orchestration():
    offenders = {}
    for path in (REPO / "ospo_core").rglob("*.py"):
        bad = sorted(m for m in imports(path)
                     if m.split(".")[0] in ("prefect", "prefect_ray", "tasks", "flows", "ospo_cli"))
        if bad:
            offenders[module_name(path)] = bad
    assert not offenders, f"ospo_core modules import the orchestration layer: {offenders}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_no_import_cycle_among_the_project_modules():
    graph = project_graph()
    assert len(graph) > 40  # the walk really saw the project
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_stage_module_imports_the_testbed():
    for path in (REPO / "ospo_core" / "stages").glob("*.py"):
        assert not [m for m in imports(path) if m.startswith("ospo_core.testbed")], path.name


# ---------------------------------------------------------------- a toy stage, declared once, run in a round

SHOUTED = pa.schema([("item_id", pa.string()), ("shout", pa.string()), ("ok", pa.bool_()), ("reason", pa.string())])


class ShoutConfig(StageConfig):
    batch_size: int = Field(4, ge=1, description="Prompts per call; the toy runs out of memory above 2.")


def shout(prompts: pa.Table, tools, cfg: ShoutConfig) -> pa.Table:
    """The prompts in capitals; pretends to run out of GPU memory while its batch is larger than 2."""
    import torch

    if cfg.batch_size > 2:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (toy)")
    rows = [{"item_id": r["item_id"], "shout": r["prompt"].upper(), "ok": True}
            for r in prompts.filter(prompts.column("ok")).to_pylist()]
    return pa.Table.from_pylist(rows, schema=SHOUTED)


def test_a_toy_stage_is_one_declaration_and_runs_in_a_round_with_its_oom_backoff_in_the_run_log(prefect, tmp_path):
    from prefect import flow, get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from ospo_core.config import RoundConfig
    from ospo_core.pipeline import Stage
    from tasks import stages
    from tasks.round import open_round
    from tasks.runner import StageTask, read_ref
    from test_flow import small_config

    shout_stage = StageTask(Stage("shouted", "shout", shout, reads=("prompts",), schema=SHOUTED))

    @flow
    def toy_round(config: RoundConfig, home: str) -> dict:
        ctx = open_round(config, home)
        prompts = stages.generate_prompts(ctx, config.prompts)
        return shout_stage(ctx, ShoutConfig(batch_size=8), prompts=prompts)

    state = toy_round(small_config(round_id="toy"), str(tmp_path), return_state=True)
    ref = state.result()
    table = read_ref(ref)
    prompts = read_ref({"table": "prompts", "path": str(tmp_path / "runs" / "toy" / "prompts")})
    ok = prompts.filter(prompts.column("ok"))
    assert table.num_rows == ok.num_rows > 0
    assert table.column("shout").to_pylist() == [p.upper() for p in ok.column("prompt").to_pylist()]
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    messages = [log.message for log in logs]
    assert any("CUDA out of memory: retrying with batch_size=4" in m for m in messages), messages
    assert any("CUDA out of memory: retrying with batch_size=2" in m for m in messages), messages
    # a rerun is a cache hit of the marker on disk
    again = toy_round(small_config(round_id="toy"), str(tmp_path), return_state=True)
    assert again.result()["hash"] == ref["hash"]
