"""The package's seams, read from the import statements: who may import whom, and no cycles."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ldm"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The ldm modules `path` imports; with top_level_only, not those imported inside functions."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ldm"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ldm"))
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    return {name for name in found if name in modules}


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def test_generation_side_never_imports_training_or_the_front_ends():
    for name, path in MODULES.items():
        if name.split(".")[1:2] in (["models"], ["sampling"], ["text"], ["io"], ["fast"]) or name in ("ldm.pipeline", "ldm.settings", "ldm.assets"):
            bad = {m for m in imports(path, top_level_only=False)
                   if m.startswith(("ldm.train", "ldm.cli", "ldm.shapes.recipe"))}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_models_know_nothing_of_speed_paths_or_sampling():
    for name, path in MODULES.items():
        if name.startswith("ldm.models"):
            bad = {m for m in imports(path, top_level_only=False) if not m.startswith("ldm.models")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_no_import_cycles():
    graph = {name: {m for m in imports(path, top_level_only=True) if m in MODULES and m != name}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
