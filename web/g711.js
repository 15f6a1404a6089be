// G.711 for the player: mu-law and A-law bytes (8 kHz telephony, output.codec "mulaw" / "alaw") to float samples,
// through 256-entry tables built exactly as realtime/audio.py builds its decoders (checked against them in
// tests/web/test_g711_js.py).

const MULAW = (() => {
  const table = new Float32Array(256);
  for (let i = 0; i < 256; i++) {
    const u = ~i & 0xff;
    const magnitude = ((((u & 0x0f) << 3) + 0x84) << ((u & 0x70) >> 4)) - 0x84;
    table[i] = (u & 0x80 ? -magnitude : magnitude) / 32768;
  }
  return table;
})();

// A-law: 13-bit magnitudes in eight segments, even bits inverted on the wire (XOR 0x55), the sign bit set for positive
const ALAW = (() => {
  const table = new Float32Array(256);
  for (let i = 0; i < 256; i++) {
    const a = i ^ 0x55;
    const segment = (a & 0x70) >> 4;
    let t = ((a & 0x0f) << 4) + (segment === 0 ? 8 : 0x108);
    if (segment > 1) t <<= segment - 1;
    table[i] = (a & 0x80 ? t : -t) / 32768;
  }
  return table;
})();

function lookup(table, bytes) {
  const out = new Float32Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) out[i] = table[bytes[i]];
  return out;
}

/** mu-law bytes -> float samples in [-1, 1). */
export function mulawToFloat(bytes) {
  return lookup(MULAW, bytes);
}

/** A-law bytes -> float samples in [-1, 1). */
export function alawToFloat(bytes) {
  return lookup(ALAW, bytes);
}
