"""Architecture metrics for kvwire's package: the numbers the protocol-engine issue (#13) tracks.

Prints, per subpackage of ``kvwire``: lines of code, cross-object private attribute reads, and the
import cycles among kvwire's modules. Reads source files only (``ast``); imports and runs nothing.

* a cross-object private read is ``<expr>._name`` (not a dunder) where ``<expr>`` is not the bare name
  ``self`` or ``cls``: ``self._session._cond``, ``handle._writers``, ``s.server._end`` (not counted:
  ``super()._hook()``, the object's own base class, and NamedTuple's underscored public API, ``_replace``...).
  Reads of a module's private names (``module._helper``) are counted apart, as ``module-private``;
* import cycles are the strongly connected components (more than one module) of the graph of imports
  between kvwire modules, at module level (``top``) and counting imports inside functions too (``all``);
  ``if TYPE_CHECKING:`` imports are left out of both (they never run).

    python scripts/arch_metrics.py            # the table
    python scripts/arch_metrics.py --json     # the same as JSON, for comparing before/after
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kvwire"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def subpackage(mod: str) -> str:
    parts = mod.split(".")
    return "kvwire" if len(parts) < 3 and not (PKG / parts[-1]).is_dir() else f"kvwire.{parts[1]}"


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("kvwire"):
        return []
    # "from pkg import mod" depends on the module (the caller keeps only names that are modules); the package
    # itself counts only when no imported name is a module ("from pkg import SomeClass" runs pkg/__init__)
    return [f"{target}.{a.name}" for a in node.names] + [target + "?"]


def imports(tree: ast.Module, mod: str, is_pkg: bool) -> tuple[set[str], set[str]]:
    """(module-level, all) kvwire modules imported, TYPE_CHECKING blocks excluded."""
    top: set[str] = set()
    every: set[str] = set()

    def visit(body: list[ast.stmt], at_top: bool) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse, at_top)
                continue
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names if a.name.startswith("kvwire")]
            elif isinstance(node, ast.ImportFrom):
                found = _resolve(mod, is_pkg, node)
            (top if at_top else every).update(found)
            every.update(found)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], (ast.stmt, ast.excepthandler)):
                    nested = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or not at_top
                    visit([n for n in inner if isinstance(n, ast.stmt)] if field != "handlers"
                          else [s for h in inner for s in h.body], at_top and not nested)

    visit(tree.body, True)
    return top, every


#: NamedTuple's public methods and attributes, which carry a leading underscore to avoid clashing with fields
NAMEDTUPLE_API = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})


def private_reads(tree: ast.Module, module_names: set[str]) -> tuple[int, int]:
    """(cross-object, module-private) reads of ``_name`` attributes."""
    imported_modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported_modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported_modules |= {a.asname or a.name for a in node.names
                                 if f"{node.module}.{a.name}" in module_names or node.module is None}
    cross = modpriv = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        a = node.attr
        if not a.startswith("_") or (a.startswith("__") and a.endswith("__")):
            continue
        v = node.value
        if isinstance(v, ast.Name) and v.id in ("self", "cls"):
            continue
        if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
            continue  # super()._hook(): the object's own base class, not another object
        if a in NAMEDTUPLE_API:
            continue  # NamedTuple's documented methods (_replace, _asdict...) are public despite the underscore
        if isinstance(v, ast.Name) and v.id in imported_modules:
            modpriv += 1
        else:
            cross += 1
    return cross, modpriv


def _targets(found: set[str], names: set[str], mod: str) -> set[str]:
    """The kvwire modules among ``found``; a "pkg?" marker (from pkg import ...) counts only where none of the
    names imported from pkg is a module."""
    mods = {t for t in found if t in names and t != mod}
    for t in found:
        if t.endswith("?"):
            pkg = t[:-1]
            if pkg in names and pkg != mod and not any(m.startswith(pkg + ".") for m in mods):
                mods.add(pkg)
    return mods


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def measure() -> dict[str, object]:
    files = sorted(PKG.rglob("*.py"))
    names = {module_name(p) for p in files}
    lines: dict[str, int] = defaultdict(int)
    cross: dict[str, int] = defaultdict(int)
    modpriv: dict[str, int] = defaultdict(int)
    top_graph: dict[str, set[str]] = {}
    all_graph: dict[str, set[str]] = {}
    for p in files:
        mod = module_name(p)
        src = p.read_text(encoding="utf-8")
        tree = ast.parse(src, str(p))
        sub = subpackage(mod)
        lines[sub] += sum(1 for ln in src.splitlines() if ln.strip() and not ln.strip().startswith("#"))
        c, m = private_reads(tree, names)
        cross[sub] += c
        modpriv[sub] += m
        top, every = imports(tree, mod, p.name == "__init__.py")
        # an import of a package runs its __init__; "from pkg import name" counts the module if it is one
        top_graph[mod] = _targets(top, names, mod)
        all_graph[mod] = _targets(every, names, mod)
    subs = sorted(lines)
    return {
        "subpackages": {s: {"lines": lines[s], "cross_object_private_reads": cross[s],
                            "module_private_reads": modpriv[s]} for s in subs},
        "cycles_top": cycles(top_graph),
        "cycles_all": cycles(all_graph),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    m = measure()
    if a.json:
        print(json.dumps(m, indent=1))
        return 0
    subs = m["subpackages"]
    assert isinstance(subs, dict)
    print(f"{'subpackage':22} {'lines':>7} {'cross-object _reads':>20} {'module-private':>15}")
    for s, row in subs.items():
        print(f"{s:22} {row['lines']:7d} {row['cross_object_private_reads']:20d} {row['module_private_reads']:15d}")
    for key, title in (("cycles_top", "import cycles, module level"), ("cycles_all", "import cycles, any level")):
        found = m[key]
        assert isinstance(found, list)
        print(f"{title}: {len(found)}")
        for comp in found:
            print("  " + " <-> ".join(comp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
