// Why: randomized tests must be reproducible. Every one takes its seed from
// DELTAVOL_SEED (or picks one) and prints it, so a failure can be replayed exactly.

export function testSeed(name: string): number {
  const fromEnv = process.env.DELTAVOL_SEED;
  const seed = fromEnv ? Number(fromEnv) : Math.floor(Math.random() * 2 ** 31);
  console.log(`[seed] ${name}: DELTAVOL_SEED=${seed}`);
  return seed;
}

/** Small fast PRNG (mulberry32): deterministic per seed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
