"""The package's import graph: no cycles, and the core never imports the ROS side.

Every import counts, also the ones inside functions (a cycle hidden in a function is still a
cycle). Parsed with ast, so nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megaloc_ros"
# Commands that start the ROS nodes (the composition root); everything else is core or ros/.
APPS = {"megaloc_ros.cli", "megaloc_ros.__main__", "megaloc_ros.demo", "megaloc_ros.eval_cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rsplit(".", 1)[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import a.b.c` where only a.b is ours, or a foreign name
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_never_imports_ros():
    bad = [(m, t) for m, ts in import_graph().items() for t in ts
           if t.startswith("megaloc_ros.ros") and not m.startswith("megaloc_ros.ros") and m not in APPS]
    assert not bad, f"core modules import the ROS side: {bad}"


def test_no_rclpy_outside_ros():
    for name, path in _modules().items():
        if name.startswith("megaloc_ros.ros"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(m.split(".")[0] == "rclpy" for m in mods), f"{name} imports rclpy"


def test_readme_layout_matches_the_tree():
    """Every module of the package is named in README's layout table (a subfolder named there
    covers its modules), and every path the table names exists."""
    import re
    root = PKG.parent
    text = (root / "README.md").read_text()
    table = text[text.index("## Layout"):text.index("## Data and licences")]
    named: set[str] = set()
    for row in (r for r in table.splitlines() if r.startswith("| `")):
        first, rest = row.split(" | ", 1)
        heads = re.findall(r"`([^`]+)`", first)
        base = heads[0][:heads[0].rstrip("/").rfind("/") + 1]
        paths = [h if "/" in h.rstrip("/") else base + h for h in heads]
        if heads[0].endswith("/"):  # a folder row: the modules and subfolders it lists
            paths += [heads[0] + m for m in re.findall(r"`([\w]+(?:\.py|/))`", rest)]
        for path in paths:
            assert (root / path).exists(), f"README's layout table names {path}, which does not exist"
            named.add(path.rstrip("/"))
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(root)
        if p.name in ("__init__.py", "__main__.py"):
            continue
        assert str(rel) in named or str(rel.parent) in named and rel.parent != PKG.relative_to(root) \
            and not any(n.startswith(str(rel.parent) + "/") for n in named), \
            f"{rel} is not in README's layout table"


def test_tests_that_talk_dds_are_marked_ros():
    """`make test` runs the tests on two workers and keeps the ``ros``-marked ones on one
    (conftest.py): a test starting nodes without the mark would share ROS domains with them."""
    starts = ("NodeSet(", "rclpy.init(", "replay_live(", "fleet_replay", '"demo", "--output"')
    test_dir = Path(__file__).resolve().parent
    unmarked = [p.name for p in sorted(test_dir.glob("test_*.py"))
                if any(s in p.read_text() for s in starts) and "mark.ros" not in p.read_text()]
    assert not unmarked, f"test files starting ROS nodes without @pytest.mark.ros: {unmarked}"
