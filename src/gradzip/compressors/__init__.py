"""Compressors: values with ``encode``/``decode``, and the registry that names them."""

from .base import Compressor
from .registry import available_compressors, compressor, decode, names, register

__all__ = ["Compressor", "available_compressors", "compressor", "decode", "names", "register"]
