"""The package's layering, read from the source: the engine imports no layer above it, and no subpackage
import cycle exists (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "python" / "dpo_fast"


def _unit(mod: str) -> str:
    """``dpo_fast.engine.rows`` -> ``engine``; a top-level module ``dpo_fast.hf`` -> ``hf``."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "dpo_fast"


def _is_module(name: str) -> bool:
    path = PKG.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or path.is_dir()


def _imports() -> dict[str, set[str]]:
    """module name -> the dpo_fast modules it imports (absolute names)."""
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        name = ".".join(parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "dpo_fast"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = parts if is_pkg else parts[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] == "dpo_fast":
                    found.add(target)
                    found |= {f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")}
        out[name] = found
    return out


def test_engine_and_kernels_import_no_higher_layer():
    forbidden = {"distributed", "integrations", "fused", "hf", "logprobs", "losses", "reference"}
    bad = [(m, t) for m, ts in _imports().items() if _unit(m) in ("engine", "kernels") for t in ts
           if _unit(t) in forbidden or t == "dpo_fast"]
    assert not bad, f"the engine / kernels import a higher layer: {bad}"


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for m, ts in _imports().items():
        graph.setdefault(_unit(m), set()).update(_unit(t) for t in ts if _unit(t) not in (_unit(m), "dpo_fast"))
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for t in sorted(graph.get(n, ())):
            visit(t)
        stack.pop()

    for n in sorted(graph):
        visit(n)
    assert not cycles, f"import cycles between dpo_fast's subpackages / modules: {cycles}"
    assert "distributed" not in graph.get("engine", set())
