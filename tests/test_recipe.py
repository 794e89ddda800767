"""The conda-forge recipe (recipe/recipe.yaml) stays in step with pyproject.toml."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent
# PyPI name -> conda-forge name, where they differ.
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base"}


def _requirement(text: str) -> tuple[str, str]:
    name, constraint = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", text).groups()
    return name.lower(), constraint.replace(" ", "")


def _recipe() -> dict:
    return yaml.safe_load((ROOT / "recipe" / "recipe.yaml").read_text())


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_run_requirements_mirror_the_dependencies():
    project = _pyproject()["project"]
    expected = {
        CONDA_NAMES.get(name, name): constraint
        for name, constraint in map(_requirement, project["dependencies"])
    }
    run = dict(map(_requirement, _recipe()["requirements"]["run"]))
    assert run.pop("python") == ">=${{python_min}}"
    assert run == expected


def test_versions_python_floor_and_entry_point_match():
    recipe, project = _recipe(), _pyproject()["project"]
    assert recipe["context"]["version"] == project["version"]
    assert project["requires-python"] == ">=" + recipe["context"]["python_min"]
    (script,) = project["scripts"].items()
    assert recipe["build"]["python"]["entry_points"] == [f"{script[0]} = {script[1]}"]
    assert recipe["build"]["noarch"] == "python"
    assert recipe["about"]["license"] == "BSD-3-Clause"


def test_optional_extras_stay_out_of_the_run_requirements():
    run = {_requirement(text)[0] for text in _recipe()["requirements"]["run"]}
    for extra in _pyproject()["project"]["optional-dependencies"].values():
        for name, _ in map(_requirement, extra):
            if name not in {_requirement(d)[0] for d in _pyproject()["project"]["dependencies"]}:
                assert CONDA_NAMES.get(name, name) not in run
