"""The library's module graph has no cycle (imports inside functions count too), and nothing
in the library imports the command-line tools."""
import ast
import os
import pkgutil

import p3o_jax

ROOT = os.path.dirname(p3o_jax.__file__)


def modules() -> dict[str, str]:
    """{module name: file} of every module of the package."""
    found = {"p3o_jax": os.path.join(ROOT, "__init__.py")}
    for info in pkgutil.walk_packages([ROOT], "p3o_jax."):
        path = os.path.join(ROOT, *info.name.split(".")[1:])
        found[info.name] = os.path.join(path, "__init__.py") if info.ispkg else path + ".py"
    return found


def imports(name: str, path: str, known) -> set[str]:
    """The package's modules that `name` imports, anywhere in the file."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for a in node.names:   # `from pkg import module` names the module
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_cycles():
    g = graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_test_sees_a_cycle(tmp_path, monkeypatch):
    """The check has teeth: a graph with a -> b -> a is reported."""
    g = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr(__import__(__name__), "graph", lambda: g)
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "'a', 'b', 'a'" in str(e)
    else:
        raise AssertionError("cycle not found")


def test_library_does_not_import_the_tools():
    g = graph()
    offenders = {m: sorted(i for i in deps if i.startswith("p3o_jax.cli"))
                 for m, deps in g.items() if not m.startswith("p3o_jax.cli")}
    assert not {m: d for m, d in offenders.items() if d}
