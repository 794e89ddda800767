"""The documentation builds with warnings as errors, without executing notebooks.

The build runs the docstrings' ``.. plot::`` examples (small models), so it takes minutes.
"""

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).parent.parent / "docs"


def test_sphinx_build_has_no_warnings(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-b",
            "html",
            "-D",
            "nb_execution_mode=off",
            str(DOCS),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr[-20_000:]}"

    generated = tmp_path / "generated"
    expected = [
        "pertpy_contrastive.ContrastiveVAE",
        "pertpy_contrastive.TrainingDivergedError",
        "pertpy_contrastive.CellGroup",
        "pertpy_contrastive.pp.perturbation_labels",
        "pertpy_contrastive.tl.calibration_check",
        "pertpy_contrastive.tl.CalibrationCheck",
        "pertpy_contrastive.tl.distance_test",
        "pertpy_contrastive.datasets.simulate_screen",
        "pertpy_contrastive.pl.latents",
        "pertpy_contrastive.pl.training_history",
    ]
    missing = [name for name in expected if not (generated / f"{name}.html").is_file()]
    assert not missing, f"API pages not generated: {missing}"

    model_page = (generated / "pertpy_contrastive.ContrastiveVAE.html").read_text()
    for method in ("setup_anndata", "train", "write_outputs", "save", "load"):
        assert f'id="pertpy_contrastive.ContrastiveVAE.{method}"' in model_page, method
    # scvi-tools' registry machinery stays out of our class page.
    assert 'id="pertpy_contrastive.ContrastiveVAE.transfer_fields"' not in model_page

    for page in ("outputs", "api", "benchmarks", "design_notes", "changelog", "references"):
        assert (tmp_path / f"{page}.html").is_file(), page
    # The tutorial notebooks are rendered (from their committed outputs).
    for notebook in ("01_papalexi_end_to_end", "02_simulated_screen"):
        assert (tmp_path / "tutorials" / f"{notebook}.html").is_file(), notebook
