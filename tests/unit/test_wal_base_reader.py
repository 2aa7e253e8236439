"""The reader a base backup is unpacked through: chunks of any size come out byte for byte, in reads
of any size (tarfile reads small blocks from decompressed chunks of megabytes)."""

from __future__ import annotations

import io
import os

from tasks.wal.base import _ChunkReader


def test_chunks_come_out_whole_in_reads_of_any_size() -> None:
    chunks = [os.urandom(n) for n in (0, 1, 5 << 20, 511, 0, 3, 1 << 20)]
    reader = _ChunkReader(iter(chunks))
    out = bytearray()
    sizes = [1, 512, 10240, 7, 1 << 20]
    for i in range(10_000):
        block = reader.read(sizes[i % len(sizes)])
        if not block:
            break
        out += block
    assert bytes(out) == b"".join(chunks)
    assert reader.read(10) == b""
    buffered = io.BufferedReader(_ChunkReader(iter(chunks)), buffer_size=1 << 20)
    assert buffered.read() == b"".join(chunks)
