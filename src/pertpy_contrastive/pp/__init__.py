"""Preprocessing: perturbation labels from pertpy's guide assignments."""

from ._guides import perturbation_labels

__all__ = ["perturbation_labels"]
