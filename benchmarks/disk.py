"""Sequential write speed of a folder's disk, the way our writer writes: 8 MiB writes, then fsync.

    python -m benchmarks.disk [FOLDER]

What the end-to-end GPU figures are measured against: shards cannot reach the disk faster.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 8 * 2**20


def seq_write_mb_s(folder: Path, total_mb: int = 512) -> float:
    """MB/s (10^6 bytes) of writing `total_mb` MiB of random bytes to a new file in `folder`,
    fsync included; the file is removed."""
    block = os.urandom(CHUNK)
    n = max(1, total_mb * 2**20 // CHUNK)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".disk-") as f:
        start = time.perf_counter()
        for _ in range(n):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        seconds = time.perf_counter() - start
    return round(n * CHUNK / seconds / 1e6, 1)


if __name__ == "__main__":
    print(seq_write_mb_s(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir())))
