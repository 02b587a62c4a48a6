"""gradzip: communication-compressed distributed SGD for PyTorch.

>>> import gradzip as gz, torch
>>> c = gz.compressor("fosgd")
>>> p = c.encode(torch.randn(1000), seed=7)
>>> p.nbits <= 1000 + 8 * 80
True
>>> gz.decode(p.data).shape
torch.Size([1000])
"""

from ._alloc import empty_cache
from .compressors import Compressor, available_compressors, compressor, decode
from .wire import Payload, PayloadError

__all__ = [
    "Compressor",
    "Payload",
    "PayloadError",
    "available_compressors",
    "compressor",
    "decode",
    "empty_cache",
]
__version__ = "0.1.0"
