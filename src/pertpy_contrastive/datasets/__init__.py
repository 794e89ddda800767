"""Data sets: a screen simulator with known truth, and a bundled real screen."""

from ._papalexi import papalexi2021_subset
from ._simulate import simulate_screen

__all__ = ["papalexi2021_subset", "simulate_screen"]
