"""Fast CPU kernels (numba); each has a pure-torch reference that the tests compare against."""
