"""Experiments: benchmarks, studies and paper reproductions behind the CLI."""
