"""Which cells responded: the responder posterior, Mixscape-style calls and responder fractions.

A mixin of :class:`~pertpy_contrastive.ContrastiveVAE`, kept apart from training and the
expression outputs. The generative model of the responder variable is in ``_module.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scipy import stats

from ._constants import GROUP_KEY, TARGET_KEY, CellGroup
from ._data import resolve_modality

CONTROL_CLASS = "NT"
"""Class of control cells, as in pertpy's Mixscape."""


class ResponderMixin:
    """Responder outputs of a trained :class:`~pertpy_contrastive.ContrastiveVAE`."""

    def _require_responder(self) -> None:
        if not self.module.responder:
            raise ValueError(
                "This model was built with responder=False, so it has no responder variable. "
                "Build it with ContrastiveVAE(adata, responder=True) and train it."
            )

    @torch.inference_mode()
    def get_responder_probability(
        self,
        adata: AnnData | MuData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 25,
        batch_size: int = 256,
        seed: int = 0,
        modality: str = "rna",
    ) -> np.ndarray:
        """Posterior probability that each cell responded to its perturbation, P(y = 1 | x).

        The model's two branches (responded: decoded with the salient latent, under the
        target's responder prior; escaped: decoded like a control) are weighed by their
        marginal likelihoods, each estimated by importance sampling with ``n_samples`` draws of
        the cell's latents from the guide. A cell's perturbation label enters only through its
        target's responder fraction and salient centre; the encoders do not see it.

        Parameters
        ----------
        adata
            Data to score; defaults to the data the model was set up with.
        indices
            Cells to score; default all.
        n_samples
            Posterior draws of the latents per cell.
        batch_size
            Cells per inference minibatch.
        seed
            Seed of the posterior draws (the result is reproducible).
        modality
            Modality when ``adata`` is a MuData.

        Returns
        -------
        Array ``(n_cells,)``: 0 for controls, NaN for cells whose label is not a trained target
        (no guide, several targets, or a label absent from training), P(y = 1 | x) otherwise.
        """
        self._check_if_trained(warn=False)
        self._require_responder()
        adata = self._validate_anndata(None if adata is None else resolve_modality(adata, modality))
        probabilities = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for tensors in self._make_data_loader(
                adata=adata, indices=indices, batch_size=batch_size
            ):
                args, _ = self.module._get_fn_args_from_batch(tensors)
                log_odds = self.module.responder_log_odds(*args, n_samples=n_samples)
                probability = torch.sigmoid(log_odds)
                is_control = args[1] == CellGroup.BACKGROUND
                probabilities.append(torch.where(is_control, 0.0, probability))
        return torch.cat(probabilities).cpu().numpy()

    def _responder_calls(self, adata: AnnData, probability: np.ndarray, threshold: float):
        """Mixscape-style classes from responder probabilities."""
        labels = adata.obs[self.get_setup_arg("perturbation_key")].astype("string")
        groups = self.get_anndata_manager(adata).get_from_registry(GROUP_KEY).ravel()
        scored = ~np.isnan(probability)
        is_control = groups == CellGroup.BACKGROUND
        responded = scored & ~is_control & (np.nan_to_num(probability) > threshold)
        global_class = np.full(len(labels), None, dtype=object)
        global_class[scored & ~is_control] = "NP"
        global_class[responded] = "KO"
        global_class[is_control] = CONTROL_CLASS
        target_class = global_class.copy()
        perturbed = scored & ~is_control
        target_class[perturbed] = labels.to_numpy()[perturbed] + " " + global_class[perturbed]
        return (
            pd.Categorical(target_class),
            pd.Categorical(global_class, categories=[CONTROL_CLASS, "NP", "KO"]),
        )

    def get_responder_fractions(
        self,
        adata: AnnData | MuData | None = None,
        by: Literal["target", "guide"] = "target",
        level: float = 0.95,
        threshold: float = 0.5,
        probability: np.ndarray | None = None,
        modality: str = "rna",
    ) -> pd.DataFrame:
        """Fraction of each target's (or guide's) cells that responded, with a credible interval.

        The fraction of a group of n cells has the variational posterior
        ``Beta(1 + sum_n p_n, 1 + sum_n (1 - p_n))`` (a uniform prior on the fraction, updated
        with each cell's responder probability p_n). Its mean and central ``level`` interval are
        reported. Different guides against one gene differ in efficiency: ``by="guide"`` shows
        which guides worked.

        Parameters
        ----------
        adata
            Data to summarise; defaults to the data the model was set up with.
        by
            ``"target"`` (the perturbation label) or ``"guide"`` (the ``guide_key`` given to
            :meth:`setup_anndata`).
        level
            Probability mass of the credible interval.
        threshold
            Probability above which a cell is counted in ``n_called``.
        probability
            Responder probabilities of the cells of ``adata``, if already computed with
            :meth:`get_responder_probability`.
        modality
            Modality when ``adata`` is a MuData.

        Returns
        -------
        DataFrame indexed by target or guide, with columns ``target``, ``n_cells``,
        ``responder_fraction`` (posterior mean), ``ci_low``, ``ci_high``, ``n_called`` (cells
        above ``threshold``) and ``prior_fraction`` (the model's learned responder fraction of
        the target, the prior of each of its cells).
        """
        adata = self.adata if adata is None else resolve_modality(adata, modality)
        if probability is None:
            probability = self.get_responder_probability(adata)
        perturbation_key = self.get_setup_arg("perturbation_key")
        guide_key = self.get_setup_arg("guide_key")
        if by == "guide" and guide_key is None:
            raise ValueError(
                "The model was set up without guide_key, so guides are unknown. Pass "
                "guide_key=<obs column of each cell's guide> to ContrastiveVAE.setup_anndata "
                "(pp.perturbation_labels writes one with guide_key_added=...)."
            )
        if by not in ("target", "guide"):
            raise ValueError(f"by must be 'target' or 'guide', got {by!r}.")
        groups = self.get_anndata_manager(adata).get_from_registry(GROUP_KEY).ravel()
        scored = ~np.isnan(probability) & (groups != CellGroup.BACKGROUND)
        obs = pd.DataFrame(
            {
                "target": adata.obs[perturbation_key].astype(str).to_numpy(),
                "group": adata.obs[guide_key if by == "guide" else perturbation_key]
                .astype(str)
                .to_numpy(),
                "p": probability,
            }
        )[scored]
        summary = obs.groupby("group", sort=True).agg(
            target=("target", "first"),
            n_cells=("p", "size"),
            responded=("p", "sum"),
            n_called=("p", lambda p: int((p > threshold).sum())),
        )
        posterior = stats.beta(
            1 + summary["responded"], 1 + summary["n_cells"] - summary["responded"]
        )
        summary["responder_fraction"] = posterior.mean()
        summary["ci_low"], summary["ci_high"] = posterior.interval(level)
        target_labels = self.adata_manager.get_state_registry(TARGET_KEY)["target_labels"]
        prior = torch.sigmoid(self.module.responder_logits.detach()).cpu().numpy()
        summary["prior_fraction"] = summary["target"].map(
            dict(zip(target_labels, prior, strict=True))
        )
        summary.index.name = by
        columns = ["target", "n_cells", "responder_fraction", "ci_low", "ci_high", "n_called"]
        return summary[[*columns, "prior_fraction"]]
