"""pyproject.toml declares what jaxgen/ imports, and nothing it does not import."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"PIL": "pillow", "absl": "absl-py", "orbax": "orbax-checkpoint",
                 "tensorflow_datasets": "tensorflow-datasets"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported() -> set[str]:
    tops = set()
    for path in (ROOT / "jaxgen").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
    tops -= set(sys.stdlib_module_names) | {"jaxgen"}
    return {_name(DISTRIBUTIONS.get(t, t)) for t in tops}


def test_imports_match_declared_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for e, reqs in project["optional-dependencies"].items() if e != "test"
              for r in reqs}
    imported = _imported()
    assert imported - required - extras == set(), "imported but not declared"
    assert required - imported == set(), "declared but never imported"
