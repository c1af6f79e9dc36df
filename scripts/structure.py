"""Print the structure measures of the package: module sizes, long parameter lists, fan-in of imports.

    python scripts/structure.py [--package circuitfind] [--max-lines 300] [--max-params 7]

Aims, not rules (issue 10): no module over about 300 lines, no function with more than about
7 parameters (self and cls not counted), and no module that imports most of the others.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def modules(package: Path) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if "configs" not in p.parts)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")]) + bool(a.vararg) + bool(a.kwarg)


def first_party_imports(tree: ast.Module, package: str) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == package}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default="circuitfind")
    parser.add_argument("--max-lines", type=int, default=300)
    parser.add_argument("--max-params", type=int, default=7)
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    files = modules(root / args.package)
    names = {module_name(p, root) for p in files}
    long_modules, long_functions, fan_out = [], [], []
    for path in files:
        text = path.read_text()
        tree = ast.parse(text)
        name = module_name(path, root)
        lines = len(text.splitlines())
        if lines > args.max_lines:
            long_modules.append((lines, name))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(node) > args.max_params:
                long_functions.append((parameter_count(node), f"{name}.{node.name}"))
        fan_out.append((len(first_party_imports(tree, args.package) & names), name))
    folders = sorted({str(p.parent.relative_to(root)) for p in files})
    print(f"{len(files)} modules in {len(folders)} folders: {', '.join(folders)}")
    print(f"largest module: {max((len(p.read_text().splitlines()), module_name(p, root)) for p in files)}")
    print(f"modules over {args.max_lines} lines: {sorted(long_modules, reverse=True) or 'none'}")
    print(f"functions over {args.max_params} parameters: {sorted(long_functions, reverse=True) or 'none'}")
    top = sorted(fan_out, reverse=True)[:3]
    print(f"most first-party imports: {', '.join(f'{n} ({c} of {len(names) - 1})' for c, n in top)}")


if __name__ == "__main__":
    main()
