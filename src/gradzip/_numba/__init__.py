"""Fast CPU kernels (numba). Each has a pure-torch reference elsewhere that tests compare against."""
