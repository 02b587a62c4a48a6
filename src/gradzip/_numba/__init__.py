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

Every kernel is ``numba.njit(cache=CACHE, ...)`` with ``CACHE`` from :mod:`.cache`, decided
once per process when the first kernel module is imported: numba checks each cached kernel
against its own source file only, so a cache built before an edit of code that a kernel
inlines from another file is not used (kernels compile in memory, one warning gives the
command that refreshes the cache) instead of being run. Nothing is deleted on import, and
importing this package runs nothing (``python -m gradzip._numba.cache`` refreshes).
"""
