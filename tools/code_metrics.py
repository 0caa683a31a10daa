"""Size metrics of the product package, for issue reviews of readability.

    .venv/bin/python tools/code_metrics.py [ROOT]        # ROOT defaults to this checkout

Prints: lines in ``daar_ops/`` (all and non-blank), the largest functions by code lines (the
function's lines, decorators and signature included, its docstring not: an operator documents
each recipe parameter there), every function over the limit, and the number of parameters each
registered operator's ``__init__`` exposes (``*args``/``**kwargs`` and ``self`` not counted).
Reads the source with ``ast`` only; imports nothing of the package.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

LIMIT = 80


def functions(root: Path):
    for path in sorted((root / "daar_ops").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    name = f"{prefix}{child.name}"
                    doc = 0
                    if child.body and isinstance(child.body[0], ast.Expr) and \
                            isinstance(getattr(child.body[0], "value", None), ast.Constant) and \
                            isinstance(child.body[0].value.value, str):
                        doc = child.body[0].end_lineno - child.body[0].lineno + 1
                    yield path.relative_to(root), name, child.end_lineno - first + 1 - doc, child
                    stack.append((child, name + "."))
                elif isinstance(child, ast.ClassDef):
                    stack.append((child, f"{prefix}{child.name}."))


def op_parameters(root: Path) -> dict[str, int]:
    counts = {}
    for path in sorted((root / "daar_ops" / "ops").glob("*.py")):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "__init__":
                    a = fn.args
                    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                    # the registered op (a module may add a wrapper taking *args/**kwargs)
                    counts[path.stem] = max(counts.get(path.stem, 0),
                                            len([n for n in names if n != "self"]))
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    root = Path(args.root)
    files = sorted((root / "daar_ops").rglob("*.py"))
    lines = [ln for f in files for ln in f.read_text(encoding="utf-8").splitlines()]
    print(f"daar_ops: {len(files)} modules, {len(lines)} lines "
          f"({sum(1 for ln in lines if ln.strip())} non-blank)")
    funcs = sorted(functions(root), key=lambda t: -t[2])
    print(f"largest functions (of {len(funcs)}), in code lines (docstrings not counted):")
    for path, name, n, _ in funcs[:args.top]:
        print(f"  {n:4d}  {path}:{name}")
    over = [(path, name, n, fn) for path, name, n, fn in funcs if n > LIMIT]
    print(f"functions over {LIMIT} lines: {len(over)}")
    for path, name, n, fn in over:
        doc = ast.get_docstring(fn) or ""
        reason = "  (reason stated)" if "Long because" in doc else ""
        print(f"  {n:4d}  {path}:{name}{reason}")
    params = op_parameters(root)
    print(f"op parameters ({sum(params.values())} in all):")
    for name, n in params.items():
        print(f"  {n:3d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
