"""The package's floors (README "Architecture"): each module imports only from its own floor or
the floors below it, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "daar_ops"

# lowest first
FLOORS = [
    ("ground", ["core", "text", "pool", "artifacts", "models", "outdir", "__init__"]),
    ("algorithms", ["algorithms", "defaults"]),
    ("models", ["features", "feature_cache", "generation", "encoders", "raters", "causal_lm"]),
    ("artifacts", ["probe_checkpoint", "report", "stage1_artifact", "ds2_report", "centroid_file"]),
    ("model access", ["model_keys"]),
    ("operators", ["ops"]),
    ("driver", ["pipeline", "evaluation", "compare_methods", "evaluation_report"]),
    ("face", ["cli", "commands", "testing", "sandbox_hooks"]),
]


def floor_of(module: str) -> int:
    """Floor index of a dotted module name under daar_ops (``daar_ops.ops.x`` -> operators)."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    for level, (_, names) in enumerate(FLOORS):
        if head in names:
            return level
    raise AssertionError(f"module {module} is on no floor: add it to FLOORS (and the README)")


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out.append((name.removesuffix(".__init__") if name != "daar_ops.__init__" else name, path))
    return out


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "daar_ops" or n.startswith("daar_ops.")}


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_imports_go_down_only(module, path):
    mine = floor_of(module)
    for target in imported(path):
        if target in ("daar_ops", "daar_ops.ops"):
            continue  # the package itself (version) / the op registry entry point
        assert floor_of(target) <= mine, (
            f"{module} ({FLOORS[mine][0]}) imports {target} ({FLOORS[floor_of(target)][0]})")


def test_algorithms_import_no_data_juicer_and_load_no_model():
    for path in sorted((PACKAGE / "algorithms").rglob("*.py")):  # subpackages too
        text = path.read_text()
        assert "data_juicer" not in text, path
        assert "from_pretrained" not in text, path


def test_product_never_imports_research_code():
    """tools/daar_research holds the research variants; no module of the package may import it."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n.split(".")[0] in ("daar_research", "tools") for n in names), path
