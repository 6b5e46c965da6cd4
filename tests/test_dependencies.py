"""Dependencies as users install them: every third-party module the packages import is a
distribution pyproject.toml declares (the runtime list, or the extra of the one module
that needs it), not something a test extra or another package happens to bring."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("registry", "router", "composition", "lorahub")
# module -> the extra that declares what only it imports
EXTRAS = {"lorahub/harness.py": "harness"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _canonical(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0])


def imported_modules(source: str) -> set[str]:
    """Top-level names of the absolute imports in `source`, wherever they stand."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}


def test_every_runtime_import_is_a_declared_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(s) for s in project["dependencies"]}
    extras = {
        extra: {_requirement_name(s) for s in specs}
        for extra, specs in project["optional-dependencies"].items()
    }
    owners = packages_distributions()
    missing = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            allowed = declared | extras.get(EXTRAS.get(where, ""), set())
            for module in sorted(imported_modules(path.read_text())):
                dists = {_canonical(d) for d in owners.get(module, [module])}
                if not dists & allowed:
                    missing.append(f"{where}: {module} ({', '.join(sorted(dists))})")
    assert not missing, "imported but not declared:\n" + "\n".join(missing)


def test_the_audit_sees_imports_inside_functions() -> None:
    source = "import os\nfrom . import x\ndef f():\n    import httpx.auth\n    from yaml import safe_load\n"
    assert imported_modules(source) == {"httpx", "yaml"}
