"""Stamped pattern streams shared by the test apps (same as tests/src/stamp.rs).

Block k (65,536 bytes) of stream `seed` is the 8-byte little-endian `k ^ seed`, then
bytes 8.. of a fixed pseudo-random body derived from the seed: a lost, duplicated or
reordered byte anywhere shows as a mismatch, and producing it is a memcpy per block.
"""
import struct

BLOCK = 65536
M = (1 << 64) - 1
_bodies = {}


def body(seed):
    b = _bodies.get(seed)
    if b is None:
        state = (seed ^ 0x9E3779B97F4A7C15) & M or 1
        words = []
        for _ in range(BLOCK // 8):
            state ^= state >> 12
            state ^= (state << 25) & M
            state ^= state >> 27
            words.append((state * 0x2545F4914F6CDD1D) & M)
        b = struct.pack("<%dQ" % (BLOCK // 8), *words)
        _bodies[seed] = b
    return b


def chunk(seed, offset, length):
    """Bytes offset..offset+length of stream `seed`."""
    out = bytearray()
    b = body(seed)
    while length > 0:
        k, at = divmod(offset, BLOCK)
        take = min(length, BLOCK - at)
        block = struct.pack("<Q", (k ^ seed) & M) + b[8:]
        out += block[at:at + take]
        offset += take
        length -= take
    return bytes(out)


class Verifier:
    def __init__(self, seed):
        self.seed = seed
        self.received = 0
        self.bad = None

    def feed(self, data):
        if self.bad is not None:
            return False
        data = memoryview(data)
        pos = 0
        b = body(self.seed)
        while pos < len(data):
            k, at = divmod(self.received, BLOCK)
            take = min(len(data) - pos, BLOCK - at)
            block = struct.pack("<Q", (k ^ self.seed) & M) + b[8:]
            if data[pos:pos + take] != block[at:at + take]:
                self.bad = self.received
                return False
            pos += take
            self.received += take
        return True
