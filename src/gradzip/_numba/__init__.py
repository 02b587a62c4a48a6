"""Fast CPU kernels (numba); each has a pure-torch reference that the tests compare against.

- :mod:`.bits`: bit and k-bit integer packing (:mod:`gradzip.bits`).
- :mod:`.rng`: the counter-based streams of :mod:`gradzip.rng`, inside kernels.
- :mod:`.simd`: hand-written LLVM vector code (butterflies, sign flips, the one-bit
  quantizer of 32 values) that the kernels below inline.
- :mod:`.fwht`: the Walsh-Hadamard transform behind :mod:`gradzip.hadamard`.
- :mod:`.fused_onebit`: FO-SGD's rotation fused with the one-bit quantizer, and the
  inverse rotation straight from the packed bits.
- :mod:`.onebit`, :mod:`.quantizers`, :mod:`.uniform`, :mod:`.sparse`: the compressors of
  ``compressors/onebit.py`` (and the statistics of the scale rules), ``quantize.py``,
  ``uniform.py`` and ``sparse.py``.
- :mod:`.parallel`: the thread pool that runs kernels on pieces of the work.
- :mod:`.cache`: whether numba's on-disk cache was compiled from the present sources.

Importing the package runs :func:`.cache.check_cache`: numba checks each cached kernel
against its own source file only, so a cache built before an edit of code that a kernel
inlines from another file is refused (with the command that drops it) instead of being run.
The check deletes nothing; dropping the cache is an explicit step.
"""

from .cache import check_cache

check_cache()
