"""The import graph: no cycles, and dependencies point one way along the data flow (every import is
counted, including those inside functions, since a lazy import is still a dependency)."""

import ast
import pathlib

import hybrid_gpt

PKG = pathlib.Path(hybrid_gpt.__file__).parent
# Each module's place in the flow; a module may import only from its own rank or an earlier one.
# present (tables, sentences, plots from data) sits just above the leaves, so every stage may render its own
# files while it imports nothing that measures.
RANKS = {"errors": 0, "compat": 0, "fsutil": 0, "runtime": 0, "presets": 0, "options": 0, "stats": 0,
         "present": 0.5, "data": 1, "model": 2, "checkpoint": 3, "interop": 3, "train": 4, "infer": 5, "analysis": 6,
         "report": 7, "pipeline": 8, "cli": 9, "__init__": 9, "__main__": 9}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{name}: relative import; the package uses absolute imports")
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) else [])
            for target in targets:
                if target and target.split(".")[0] == "hybrid_gpt" and target != "hybrid_gpt":
                    # `from hybrid_gpt.model import kernels` names a module; otherwise the module itself.
                    if isinstance(node, ast.ImportFrom):
                        subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                        deps.update(subs or [target])
                    else:
                        deps.add(target)
        deps.discard(name)
        graph[name] = {d for d in deps if d in modules}
    return graph


def _rank(module: str) -> int:
    parts = module.split(".")
    return RANKS[parts[1]] if len(parts) > 1 else RANKS["__init__"]


def test_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_dependencies_point_along_the_flow():
    graph = _graph()
    backwards = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                       if m != "hybrid_gpt" and _rank(d) > _rank(m))
    assert not backwards, "imports against the data flow: " + ", ".join(backwards)


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle check can fail: a graph with a cycle is reported."""
    import test_imports

    monkeypatch.setattr(test_imports, "_graph", lambda: {"a": {"b"}, "b": {"c"}, "c": {"a"}})
    try:
        test_import_graph_has_no_cycle()
    except AssertionError as e:
        assert "a -> b -> c -> a" in str(e)
    else:
        raise AssertionError("cycle not found")


def _private_imports() -> list[str]:
    """Every `from hybrid_gpt.x import _name` across modules: a private name is its module's own business."""
    found = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hybrid_gpt"):
                found += [f"{_module_name(path)} imports {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return sorted(found)


def test_no_module_imports_another_s_private_names():
    private = _private_imports()
    assert not private, "private names imported across modules: " + ", ".join(private)


def test_the_private_import_check_can_fail(tmp_path, monkeypatch):
    import test_imports

    (tmp_path / "hybrid_gpt").mkdir()
    (tmp_path / "hybrid_gpt" / "a.py").write_text("from hybrid_gpt.b import _secret\n")
    monkeypatch.setattr(test_imports, "PKG", tmp_path / "hybrid_gpt")
    assert test_imports._private_imports() == ["hybrid_gpt.a imports hybrid_gpt.b._secret"]


MAX_FUNCTION_LINES = 80  # a function a reader can hold; ruff's C901 (pyproject.toml) caps its branches


def test_no_library_function_runs_past_80_lines():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions longer than 80 lines: " + ", ".join(long)
