"""The bundled subset of the Papalexi et al. 2021 THP-1 ECCITE-seq screen."""

from importlib.resources import as_file, files

import mudata as md


def papalexi2021_subset() -> md.MuData:
    """Load the bundled 5,957-cell subset of the Papalexi 2021 THP-1 CRISPR-KO screen.

    Papalexi et al. 2021, *Nature Genetics* 53:322-331 (GEO GSE153056), as distributed by the
    ``sceptredata`` R package (MIT licence). Cells were subsampled per target (up to 1,200
    non-targeting and 200 per target) by ``scripts/make_papalexi_subset.py``; counts are raw.
    Nothing is downloaded.

    Returns
    -------
    MuData with ``rna`` (299 genes, raw UMIs), ``gdo`` (110 guides, ``var['target_gene']``,
    controls mapped to ``'non-targeting'``) and ``obs['replicate']``.
    """
    with as_file(files(__package__) / "data" / "papalexi2021_thp1_small.h5mu") as path:
        return md.read_h5mu(path)
