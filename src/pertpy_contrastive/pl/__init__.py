"""Plotting: latents, target ranking, responder probabilities and training curves."""

from ._plots import latents, perturbation_ranking, responder_probabilities, training_history

__all__ = ["latents", "perturbation_ranking", "responder_probabilities", "training_history"]
