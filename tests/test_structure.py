"""The package's shape (ARCHITECTURE.md): rooms in layers, arrows only downward, no import circles,
short files; the worker's modules load without torch; the documented import paths work."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "segcli"
# top to bottom: a room imports only rooms of a lower rank (rooms of one rank never import each other)
LAYERS = [
    ["(face)", "api", "ray", "__main__"],
    ["cli"],
    ["serve"],
    ["pipeline", "training"],
    ["evaluation"],
    ["inference"],
    ["embeddings", "models"],
    ["modeling"],
    ["postprocess"],
    ["datasets"],
    ["inputs", "vocabulary"],
    ["files"],
    ["options"],
    ["errors", "version"],
]
RANK = {room: len(LAYERS) - i for i, rooms in enumerate(LAYERS) for room in rooms}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    """Every segcli name a module imports, module level or inside functions, as dotted paths."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.update([base] + [f"{base}.{a.name}" for a in node.names])
    return {n for n in names if n == "segcli" or n.startswith("segcli.")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = {owner(n) for n in _imports(path, module)}
        # a package's own __init__ and the face are where everyone starts: not an arrow
        graph[module] = {t for t in targets if t and t != module and t != "segcli" and not module.startswith(t + ".")}
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(face)"


def test_no_import_circles():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_arrows_run_downward_between_rooms():
    rooms = {_room(m) for m in _modules()} - {"assets"}
    assert rooms <= set(RANK), f"a room without a layer: {sorted(rooms - set(RANK))} (add it to LAYERS and ARCHITECTURE.md)"
    upward = sorted(f"{m} -> {t}" for m, targets in _graph().items() for t in targets
                    if _room(m) != _room(t) and RANK[_room(t)] >= RANK[_room(m)])
    assert upward == []


def test_few_modules_at_the_top_and_no_long_files():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= 6, top
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def test_worker_modules_and_the_help_path_load_without_torch():
    """predict's workers import the host stages without torch; --help builds train's options without it."""
    code = ("import sys, segcli.pipeline.worker_preload, segcli.pipeline.parcels, segcli.cli.root; "
            "print(sorted(m for m in ('torch', 'open_clip', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_readme_python_api_imports():
    from segcli import Segmenter, embeddings
    from segcli.api import Segmenter as ApiSegmenter
    from segcli.datasets.segmentation import open_dataset  # noqa: F401
    from segcli.evaluation.evaluate import evaluate  # noqa: F401
    from segcli.modeling import build_model  # noqa: F401
    from segcli.models import load_model, resolve_model  # noqa: F401
    from segcli.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: F401
    from segcli.models.export import export_model  # noqa: F401
    from segcli.training.options import TrainOptions  # noqa: F401
    from segcli.training.trainer import start_training  # noqa: F401

    assert Segmenter is ApiSegmenter and callable(embeddings.load) and embeddings.PixelEmbeddings.__name__ == "PixelEmbeddings"
    assert resolve_model("lseg_tiny").kind == "architecture"
    with pytest.raises(AttributeError):
        embeddings.not_a_name  # noqa: B018
