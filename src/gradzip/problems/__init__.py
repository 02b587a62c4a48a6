"""Problems: datasets read from paths, models, and the gradients the workers compute."""

from .datasets import DataError, Dataset
from .problem import PROBLEMS, Problem, Recipe, build, smoothness

__all__ = ["DataError", "Dataset", "PROBLEMS", "Problem", "Recipe", "build", "smoothness"]
