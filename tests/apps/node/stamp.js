// Stamped pattern streams, the same as tests/src/stamp.rs and tests/apps/stamp.py: block k
// (65,536 bytes) of stream `seed` is the 8-byte little-endian `k ^ seed`, then bytes 8.. of
// a fixed pseudo-random body derived from the seed.
'use strict';

const BLOCK = 65536;
const M = (1n << 64n) - 1n;
const bodies = new Map();

function body(seed) {
  let b = bodies.get(seed);
  if (b) return b;
  let state = (BigInt(seed) ^ 0x9E3779B97F4A7C15n) & M;
  if (state === 0n) state = 1n;
  b = Buffer.alloc(BLOCK);
  for (let i = 0; i < BLOCK / 8; i++) {
    state ^= state >> 12n;
    state ^= (state << 25n) & M;
    state ^= state >> 27n;
    b.writeBigUInt64LE((state * 0x2545F4914F6CDD1Dn) & M, i * 8);
  }
  bodies.set(seed, b);
  return b;
}

function block(seed, k) {
  const out = Buffer.from(body(seed));
  out.writeBigUInt64LE((BigInt(k) ^ BigInt(seed)) & M, 0);
  return out;
}

// Bytes offset..offset+length of stream `seed`.
function chunk(seed, offset, length) {
  const out = Buffer.alloc(length);
  let pos = 0;
  while (pos < length) {
    const at = offset + pos;
    const k = Math.floor(at / BLOCK);
    const within = at % BLOCK;
    const take = Math.min(BLOCK - within, length - pos);
    block(seed, k).copy(out, pos, within, within + take);
    pos += take;
  }
  return out;
}

class Verifier {
  constructor(seed) {
    this.seed = seed;
    this.received = 0;
    this.bad = null;
  }

  feed(data) {
    if (this.bad !== null) return false;
    let pos = 0;
    while (pos < data.length) {
      const k = Math.floor(this.received / BLOCK);
      const within = this.received % BLOCK;
      const take = Math.min(BLOCK - within, data.length - pos);
      const expected = block(this.seed, k);
      if (Buffer.compare(data.subarray(pos, pos + take), expected.subarray(within, within + take)) !== 0) {
        this.bad = this.received;
        return false;
      }
      pos += take;
      this.received += take;
    }
    return true;
  }
}

module.exports = { BLOCK, chunk, Verifier, body };
