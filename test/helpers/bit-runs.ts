// Why: bitmap tests compare PagedBitmap.runs() with a plain model of set bits; this turns
// the model into the same [start, count] runs, in one place.

/** Maximal runs of the given bit indexes as [start, count] pairs, in ascending order. */
export function runsOfBits(bits: Iterable<number>): [number, number][] {
  const sorted = [...bits].sort((a, b) => a - b);
  const out: [number, number][] = [];
  for (const b of sorted) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === b) last[1]++;
    else if (!last || last[0] + last[1] < b) out.push([b, 1]);
  }
  return out;
}
