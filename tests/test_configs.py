"""The recipes in jaxgen/configs: one base, every field chosen, importable from the package."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from jaxgen.configs import RECIPES, base

CONFIGS = Path(__file__).resolve().parents[1] / "jaxgen" / "configs"


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_registry_lists_every_recipe_file():
    files = {p.stem for p in CONFIGS.glob("*.py")} - {"__init__", "base"}
    assert set(RECIPES) == {f for f in files if not f.startswith("_")}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_on_base_and_sets_every_placeholder(name):
    config = importlib.import_module(f"jaxgen.configs.{name}").get_config().to_dict()
    defaults = _leaves(base.get_config().to_dict())
    leaves = _leaves(config)
    dropped = [k for k in defaults if k not in leaves and not any(
        f.startswith(f"{k}.") for f in leaves)]  # an empty dict of arguments may be filled
    assert not dropped, f"{name} drops or renames fields of the base: {dropped}"
    optional = {"data.resolution", "data.pad_to", "eval.fid_reference_num",
                "distill.teacher", "distill.teacher_weights",
                "parallel.coordinator", "parallel.num_processes", "parallel.process_id"}
    unset = [k for k, v in defaults.items() if v is None and k not in optional
             and leaves[k] is None]
    assert not unset, f"{name} leaves base placeholders unset: {unset}"


@pytest.mark.parametrize("name", RECIPES)
def test_paper_recipes_do_not_import_the_toy_recipe(name):
    tree = ast.parse((CONFIGS / f"{name}.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "fashion_mnist" not in imported
