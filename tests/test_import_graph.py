"""The import graph of npu_fp points one way: no cycles, and no import inside a function except
the optional heavy dependencies listed here with the reason."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "npu_fp"

# (module, imported module) -> why it is imported inside a function
FUNCTION_LEVEL_ALLOWED = {
    ("npu_fp.device", "torch_npu"): "Ascend only; importing it without CANN breaks torch",
    ("npu_fp.realweights", "gguf"): "optional `realweights` extra, only for the real-weight set",
    ("npu_fp.realweights", "transformers.integrations.gguf"): (
        "optional `forward` extra, only to build the real-weight GGUFs' tokenizer.json"
    ),
    ("npu_fp.io.gguf_codec", "gguf"): "optional `gguf` extra: only GGUF inputs need it",
    ("npu_fp.io.gguf_file", "gguf"): "optional `gguf` extra: only GGUF inputs need it",
    ("npu_fp.forward.layers", "transformers"): "optional `forward` extra",
    ("npu_fp.forward.layers", "transformers.masking_utils"): "optional `forward` extra",
    ("npu_fp.forward.layers", "npu_fp.forward.pangu"): "pangu.py imports transformers at the top",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute names of what `node` imports (module.attr for `from m import attr`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        anchor = anchor if is_package else anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    return [base, *(f"{base}.{a.name}" for a in node.names)]


def imports_of(module: str, path: Path) -> list[tuple[list[str], str | None, int]]:
    """(imported names, enclosing function or None, line) for every import statement."""
    is_package = path.name == "__init__.py"
    out: list[tuple[list[str], str | None, int]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, getattr(child, "name", "<lambda>"))
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((imported(child, module, is_package), function, child.lineno))
            visit(child, function)

    visit(ast.parse(path.read_text(), str(path)), None)
    return out


def scan(
    files: dict[str, Path],
) -> tuple[dict[str, set[str]], list[tuple[str, str, str, int]]]:
    """Module-level edges inside the package, and every import inside a function."""
    edges: dict[str, set[str]] = {m: set() for m in files}
    inner: list[tuple[str, str, str, int]] = []
    for module, path in files.items():
        for names, function, line in imports_of(module, path):
            if function is not None:
                inner.append((module, names[0], function, line))
            else:
                edges[module].update(n for n in names if n in files and n != module)
    return edges, inner


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def package_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_cycles() -> None:
    edges, _ = scan(package_files())
    assert len(edges) > 50  # the scan saw the package
    assert "npu_fp.compare.job" in edges["npu_fp.commands"]  # and resolved its edges
    assert cycles(edges) == []


def test_cycle_detection_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_level_imports_outside_the_allow_list() -> None:
    _, inner = scan(package_files())
    bad = [
        f"{m}:{line} imports {name} inside {fn}()"
        for m, name, fn, line in inner
        if (m, name) not in FUNCTION_LEVEL_ALLOWED
    ]
    assert not bad, "\n".join(bad)
    stale = set(FUNCTION_LEVEL_ALLOWED) - {(m, name) for m, name, *_ in inner}
    assert not stale, f"allow-list entries no longer used: {sorted(stale)}"


def test_nothing_below_the_commands_imports_them() -> None:
    edges, _ = scan(package_files())
    importers = sorted(m for m, targets in edges.items() if "npu_fp.commands" in targets)
    assert importers == ["npu_fp.__main__"]
    # compare/ never imports the fingerprint job above it, nor the report package after it
    for m, targets in edges.items():
        if m.startswith("npu_fp.compare"):
            assert "npu_fp.fingerprint" not in targets, m
            assert not any(t.startswith("npu_fp.report") for t in targets), m
