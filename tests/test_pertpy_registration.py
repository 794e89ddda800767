"""pertpy.tl.ContrastiveVAE, tested against the installed pertpy."""

import subprocess
import sys
from importlib.metadata import entry_points

import pertpy as pt
import pytest

import pertpy_contrastive as pc
from pertpy_contrastive._pertpy_registration import register_with_pertpy


def test_tool_is_registered():
    assert pt.tl.ContrastiveVAE is pc.ContrastiveVAE
    from pertpy.tools import ContrastiveVAE

    assert ContrastiveVAE is pc.ContrastiveVAE
    assert "ContrastiveVAE" in dir(pt.tl)


def test_registration_is_idempotent():
    assert register_with_pertpy(pc.ContrastiveVAE)
    assert register_with_pertpy(pc.ContrastiveVAE)
    assert pt.tl.__all__.count("ContrastiveVAE") == 1


def test_a_different_tool_is_never_replaced(monkeypatch):
    other = object()
    monkeypatch.setattr(pt.tl, "ContrastiveVAE", other)
    with pytest.warns(UserWarning, match="did not replace it"):
        assert not register_with_pertpy(pc.ContrastiveVAE)
    assert pt.tl.ContrastiveVAE is other


def test_pertpy_lazy_loading_survives():
    code = (
        "import sys, pertpy_contrastive, pertpy as pt;"
        "lazy = 'pertpy.tools._differential_gene_expression';"
        "assert lazy not in sys.modules, 'loaded eagerly';"
        "assert pt.tl.WilcoxonTest.__name__ == 'WilcoxonTest';"
        "assert lazy in sys.modules;"
        "assert pt.tl.ContrastiveVAE is pertpy_contrastive.ContrastiveVAE"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_entry_point_is_declared():
    (point,) = entry_points(group="pertpy.tools", name="ContrastiveVAE")
    assert point.load() is pc.ContrastiveVAE
