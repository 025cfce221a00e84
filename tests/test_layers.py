"""The layers of docs/ARCHITECTURE.md hold: no module imports from a higher layer, no import cycle
among the project's modules, and the gateway runs without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# lowest first; a package may import from its own layer's other packages only where listed
LAYERS = {
    "protos": 0,
    "common": 0,
    "discovery": 1,
    "peer": 2,
    "gateway": 2,
    "swarm": 3,
}
SIDEWAYS_FORBIDDEN = {("peer", "gateway"), ("gateway", "peer")}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules that `path` imports anywhere (function-level imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # the deepest project module the name refers to
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def test_no_import_from_a_higher_layer():
    wrong = []
    for module, targets in import_graph().items():
        here = module.split(".")[0]
        for target in targets:
            there = target.split(".")[0]
            if LAYERS[there] > LAYERS[here] or (here, there) in SIDEWAYS_FORBIDDEN:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ importing its own submodules is not a cycle
    edges = {
        m: {t for t in ts if not m.startswith(t + ".") and t != m.rpartition(".")[0]}
        for m, ts in graph.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_test_sees_a_violation(tmp_path):
    """The walk finds function-level and relative imports (else the tests above prove nothing)."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from gateway.app import create_app\n    from .sibling import x\n")
    found = imports_of(source, "discovery.mod", {"gateway.app", "discovery.sibling", "gateway"})
    assert found == {"gateway.app", "discovery.sibling"}


# As if torch were not installed: `import torch` fails, and `importlib.util.find_spec("torch")`
# (which transformers asks) answers None.
BLOCK_TORCH = """
import sys
sys.modules["torch"] = None
"""


def test_gateway_imports_no_torch(tmp_path):
    """The gateway, its app and a model's tokenizer load in a process without torch (transformers,
    when torch is installed, imports it by itself; the gateway does not need it)."""
    from peer.demo_model import create_demo_model

    model_dir = create_demo_model(tmp_path / "m", preset="tiny")
    script = (
        BLOCK_TORCH
        + f"""
import gateway.app, gateway.serving.chat, gateway.serving.completion
from gateway.models import load_model
from gateway.settings import GatewaySettings
gateway.app.create_app(GatewaySettings(models={{"m": {str(model_dir)!r}}}))
served = load_model("m", {str(model_dir)!r})
assert served.tokenizer("hello")["input_ids"]
assert sys.modules["torch"] is None, "torch was imported"
print("ok")
"""
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_torch_block_works():
    """The blocker really blocks (else the test above proves nothing)."""
    script = BLOCK_TORCH + "import torch\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr


@pytest.mark.slow
def test_a_running_gateway_has_no_torch_loaded(demo_gateway):
    """`swarm gateway` runs as if torch were absent, even where it is installed."""
    from pathlib import Path

    import httpx

    gateway = demo_gateway("layers")
    assert httpx.get(f"{gateway.address}/health", timeout=10).status_code == 200
    maps = Path(f"/proc/{gateway.process.pid}/maps").read_text()
    assert "libtorch" not in maps
