"""No import cycle among memcompile's modules: the graph of their imports, function-level ones
included (a lazy import that closes a cycle is a cycle postponed), has no strongly connected part."""
import pkgutil

import memcompile
from memcompile.passes.base import imports_of, module_file


def _import_graph() -> dict[str, tuple[str, ...]]:
    names = ["memcompile"] + [m.name for m in pkgutil.walk_packages(memcompile.__path__, "memcompile.")]
    return {m: imports_of(m) for m in names if module_file(m) is not None}


def _cycles(graph: dict[str, tuple[str, ...]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (or a module importing itself)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while not part or part[-1] != v:
                part.append(stack.pop())
                on_stack.discard(part[-1])
            if len(part) > 1 or v in graph.get(v, ()):
                found.append(sorted(part))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = _import_graph()
    assert "memcompile.pipeline" in graph and "memcompile.passes.compression.velora" in graph
    assert _cycles(graph) == []


def test_the_check_finds_a_cycle():
    # The one memcompile had: the compression pass's cache key imported the pipeline that runs it.
    graph = _import_graph()
    graph["memcompile.passes.activation_compression"] += ("memcompile.pipeline",)
    assert any("memcompile.pipeline" in c and "memcompile.passes.activation_compression" in c
               for c in _cycles(graph))


def test_import_memcompile_is_light_and_every_public_name_resolves():
    import subprocess
    import sys

    code = ("import sys, memcompile; loaded = [m for m in ('torch', 'triton') if m in sys.modules]; "
            "print(','.join(loaded) or 'none'); "
            "missing = [n for n in memcompile.__all__ if getattr(memcompile, n, None) is None]; print(missing)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "none"  # nothing heavy until a name is used
    assert out[1] == "[]"


def test_public_functions_are_not_shadowed_by_submodules():
    # A submodule named like a public function would replace it on the package once imported.
    import importlib.util

    import memcompile

    for name in memcompile.__all__:
        assert importlib.util.find_spec(f"memcompile.{name}") is None or name in memcompile._SUBMODULES, name
