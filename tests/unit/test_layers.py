"""The layering holds: what each layer may import, no import cycle, light servers.

Layers, lowest first (docs/architecture.md):
  runtime     omni_rpc (config, settings, logging, metrics, security, servers, backoff,
              validation, v1)
  servers     coordinator, node_agent            import the runtime only
  sdk         omni_rpc.sdk                        runtime; coordinator.strategies (pure routing
                                                  policies, to preview a distribution); the
                                                  launchers only when it starts a cluster
  launchers   omni_rpc.launchers                  runtime; node_agent inside a Ray actor
  cli         omni_rpc.cli                        anything
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("omni_rpc", "coordinator", "node_agent")


def layer(module: str) -> str:
    for prefix, name in (
        ("omni_rpc.sdk", "sdk"),
        ("omni_rpc.launchers", "launchers"),
        ("omni_rpc.cli", "cli"),
        ("omni_rpc.__main__", "cli"),
        ("coordinator", "coordinator"),
        ("node_agent", "node_agent"),
        ("omni_rpc", "runtime"),
    ):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return ""


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    # At module level (runs on import), not inside a function or a TYPE_CHECKING block.
    eager: bool
    # Only for the type checker (``if TYPE_CHECKING:``): no dependency at run time.
    typing: bool = False


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[Import]:
    source = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, eager: bool, typing: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_eager, child_typing = eager, typing
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                child_eager = False
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                child_eager, child_typing = False, True
            if isinstance(child, ast.Import):
                found.extend(Import(source, a.name, eager, typing) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    # `from pkg import module` imports pkg.module when it is one.
                    candidate = f"{child.module}.{alias.name}"
                    target = candidate if _is_module(candidate) else child.module
                    found.append(Import(source, target, eager, typing))
            visit(child, child_eager, child_typing)

    visit(tree, True, False)
    return [i for i in found if layer(i.target)]


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def all_imports() -> list[Import]:
    paths = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return [i for p in paths if "/v1/" not in p.as_posix() for i in imports_of(p)]


ALLOWED = {
    "runtime": {"runtime"},
    "coordinator": {"runtime", "coordinator"},
    "node_agent": {"runtime", "node_agent"},
    "sdk": {"runtime", "sdk", "coordinator", "launchers"},
    "launchers": {"runtime", "launchers", "node_agent"},
    "cli": {"runtime", "coordinator", "node_agent", "sdk", "launchers", "cli"},
}


def test_each_layer_imports_only_what_it_may() -> None:
    wrong = [
        f"{i.source} -> {i.target}"
        for i in all_imports()
        if (not i.typing and layer(i.target) not in ALLOWED[layer(i.source)])
        # The SDK previews the coordinator's plan with its pure routing policies, nothing more.
        or (
            layer(i.source) == "sdk"
            and layer(i.target) == "coordinator"
            and not i.target.startswith("coordinator.strategies")
        )
    ]
    assert wrong == []


def test_lazy_edges_stay_lazy() -> None:
    """Starting a cluster, and embedding an agent in a Ray actor, happen on those paths only."""
    eager = [
        f"{i.source} -> {i.target}"
        for i in all_imports()
        if i.eager
        and (layer(i.source), layer(i.target))
        in {("sdk", "launchers"), ("launchers", "node_agent")}
    ]
    assert eager == []


def test_no_import_cycle_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for i in all_imports():
        if i.eager and i.source != i.target:
            graph.setdefault(i.source, set()).add(i.target)
    # A package's __init__ importing its own modules is how packages work, not a cycle.
    for source, targets in graph.items():
        graph[source] = {t for t in targets if not source.startswith(t + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            assert visit(module) is None, " -> ".join(path)


def test_the_import_scan_sees_real_edges() -> None:
    """Guards the scan itself: known edges must be found, with the right eagerness."""
    edges = {(i.source, i.target, i.eager) for i in all_imports()}
    assert ("coordinator.dispatch", "coordinator.registry", True) in edges
    assert ("omni_rpc.sdk.orchestrator", "omni_rpc.launchers", False) in edges
    assert ("omni_rpc.launchers.ray_actors", "node_agent.main", False) in edges


HEAVY = ("omni_rpc.sdk", "omni_rpc.cli", "omni_rpc.launchers", "ray", "vllm", "torch")


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("coordinator.main", HEAVY),
        ("node_agent.main", HEAVY),
        ("omni_rpc", HEAVY),
        # A client of a running coordinator does not pay for launchers, Ray or the CLI.
        ("omni_rpc.sdk", ("omni_rpc.cli", "omni_rpc.launchers", "ray", "vllm", "torch")),
    ],
)
def test_importing_a_server_loads_no_sdk_cli_or_ray(
    module: str, forbidden: tuple[str, ...]
) -> None:
    code = (
        f"import sys, {module}\n"
        f"loaded = sorted(m for m in sys.modules if m.startswith({forbidden!r}))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, f"{module} loaded {done.stdout.strip()} {done.stderr[-2000:]}"


def test_sdk_names_still_come_from_the_top_package() -> None:
    code = (
        "import sys, omni_rpc\n"
        "assert 'omni_rpc.sdk' not in sys.modules\n"
        "from omni_rpc import DistributedOrchestrator, GenerationError\n"
        "assert DistributedOrchestrator.__module__ == 'omni_rpc.sdk.orchestrator'\n"
        "try:\n"
        "    omni_rpc.NoSuchThing\n"
        "except AttributeError as exc:\n"
        "    assert 'NoSuchThing' in str(exc)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
