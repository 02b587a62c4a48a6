"""Fast CPU kernels (numba); each has a pure-torch reference that the tests compare against.

numba's on-disk cache (``cache=True``) keys each compiled function on its own source file
only. A kernel that inlines a function of another module here (``quantize`` inlines
``fwht.quant32``, most inline ``rng.hash32``) would keep the old inlined code after an edit
of that other module, and run it silently. So on import, before any kernel is loaded, a
digest of the sources the kernels are compiled from is compared with the one their cache
was built from, and a stale cache is dropped (:func:`drop_stale_cache`). An installed
package never changes its sources; this is for a working tree under edit.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent
STAMP = "gradzip-kernel-sources.sha256"


def drop_stale_cache(here: Path = _HERE, also: tuple[Path, ...] = ()) -> bool:
    """Remove numba's cache files (``*.nbi``, ``*.nbc``) in ``here/__pycache__`` unless it
    was built from the present ``here/*.py`` and ``also`` (by digest); returns whether it
    removed them. Best effort: an unwritable cache directory is left as it is."""
    digest = hashlib.sha256()
    for path in sorted(here.glob("*.py")) + sorted(also):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    cache = here / "__pycache__"
    stamp = cache / STAMP
    try:
        if stamp.read_text() == digest.hexdigest():
            return False
    except OSError:
        pass  # no stamp yet: whatever is cached may be stale
    try:
        cache.mkdir(exist_ok=True)
        for f in cache.glob("*.nb[ic]"):
            f.unlink(missing_ok=True)
        tmp = cache / f"{STAMP}.{os.getpid()}"
        tmp.write_text(digest.hexdigest())
        tmp.replace(stamp)  # atomic: ranks importing at once each write a whole stamp
    except OSError:
        return False
    return True


drop_stale_cache(also=(_HERE.parent / "rng.py",))  # _numba.rng compiles in its MASK32
