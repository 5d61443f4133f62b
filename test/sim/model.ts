// Why: the checker needs to say, of any volume content, which acknowledged writes it
// holds, cheaply and without ambiguity. Every client write fills its 512-byte sectors with
// a pattern naming the write and the sector (so a torn, misplaced or corrupted sector is
// recognised), and a Timeline records what one primary's volume held after each write it
// issued (and after each crash, what it held once recovered). A volume content is then a
// vector of write ids per sector; "equals the old primary at some prefix of its writes"
// is a hash lookup; "holds every write acknowledged before t" is a comparison of
// positions in each sector's history.

export const SECTOR = 512;
const headerBytes = 8;
const fills: Buffer[] = Array.from({ length: 256 }, (_, b) => Buffer.alloc(SECTOR - headerBytes, b));
const zeroSector = Buffer.alloc(SECTOR);
/** A sector that is neither zero nor a well-formed write of this sector. */
export const GARBAGE = -1;

function fillByte(id: number, sector: number): number {
  return (Math.imul(id, 167) + Math.imul(sector, 13) + 1) & 0xff;
}

/** The content of sectors [first, first+count) written by write `id`. */
export function writeData(id: number, first: number, count: number): Buffer {
  const b = Buffer.alloc(count * SECTOR);
  for (let i = 0; i < count; i++) {
    const s = first + i;
    b.writeUInt32LE(id, i * SECTOR);
    b.writeUInt32LE(s, i * SECTOR + 4);
    b.fill(fillByte(id, s), i * SECTOR + headerBytes, (i + 1) * SECTOR);
  }
  return b;
}

/** Write id held by each sector of `content` (0: zeroes, GARBAGE: anything else). */
export function decode(content: Buffer): Int32Array {
  const n = Math.floor(content.length / SECTOR);
  const v = new Int32Array(n);
  for (let s = 0; s < n; s++) {
    const at = s * SECTOR;
    const id = content.readUInt32LE(at);
    if (id === 0) {
      v[s] = content.compare(zeroSector, 0, SECTOR, at, at + SECTOR) === 0 ? 0 : GARBAGE;
      continue;
    }
    const ok = content.readUInt32LE(at + 4) === s && content.compare(fills[fillByte(id, s)]!, 0, SECTOR - headerBytes, at + headerBytes, at + SECTOR) === 0;
    v[s] = ok ? id : GARBAGE;
  }
  return v;
}

function mix(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x7feb352d);
  x = Math.imul(x ^ (x >>> 15), 0x846ca68b);
  return (x ^ (x >>> 16)) >>> 0;
}
function h1(s: number, id: number): number {
  return mix(Math.imul(s, 0x9e3779b1) ^ Math.imul(id + 1, 0x85ebca77));
}
function h2(s: number, id: number): number {
  return mix(Math.imul(s + 0x5bd1e995, 0xc2b2ae35) ^ Math.imul(id + 7, 0x27d4eb2f));
}

/** A vector's hash (order-independent sum of per-sector hashes, so updates are O(1)). */
export function vectorKey(v: Int32Array): number {
  let a = 0;
  let b = 0;
  for (let s = 0; s < v.length; s++) {
    a = (a + h1(s, v[s]!)) >>> 0;
    b = (b + h2(s, v[s]!)) >>> 0;
  }
  return a * 2 ** 21 + (b & 0x1fffff);
}

export interface WriteRecord {
  id: number;
  first: number;
  count: number;
  issuedAtMs: number;
  ackedAtMs: number | null;
  /** Index of the timeline state right after it. */
  index: number;
}

/**
 * What one primary's volume held over time: state 0 is its base (the content it had when
 * it became primary), each issued write or observed crash recovery makes the next state.
 */
export class Timeline {
  readonly writes: WriteRecord[] = [];
  readonly current: Int32Array;
  /** Per sector: the ids it held, in order, and the state index each came in. */
  private readonly hist: { ids: number[]; at: number[] }[];
  private a = 0;
  private b = 0;
  /** State hash → indices of the states with that hash. */
  private readonly states = new Map<number, number[]>();
  stateCount = 0;
  /** Writes of this timeline by id. */
  readonly byId = new Map<number, WriteRecord>();

  constructor(
    readonly label: string,
    base: Int32Array,
    readonly startedAtMs: number,
  ) {
    this.current = base.slice();
    this.hist = Array.from({ length: base.length }, (_, s) => ({ ids: [base[s]!], at: [0] }));
    for (let s = 0; s < base.length; s++) {
      this.a = (this.a + h1(s, base[s]!)) >>> 0;
      this.b = (this.b + h2(s, base[s]!)) >>> 0;
    }
    this.record();
  }

  private record(): void {
    const key = this.a * 2 ** 21 + (this.b & 0x1fffff);
    const idx = this.stateCount++;
    const l = this.states.get(key);
    if (l) l.push(idx);
    else this.states.set(key, [idx]);
  }

  private set(s: number, id: number): void {
    const old = this.current[s]!;
    if (old === id) return;
    this.a = (this.a - h1(s, old) + h1(s, id)) >>> 0;
    this.b = (this.b - h2(s, old) + h2(s, id)) >>> 0;
    this.current[s] = id;
    this.hist[s]!.ids.push(id);
    this.hist[s]!.at.push(this.stateCount);
  }

  issue(id: number, first: number, count: number, nowMs: number): WriteRecord {
    for (let s = first; s < first + count; s++) this.set(s, id);
    const w: WriteRecord = { id, first, count, issuedAtMs: nowMs, ackedAtMs: null, index: this.stateCount };
    this.record();
    this.writes.push(w);
    this.byId.set(id, w);
    return w;
  }

  /** The content observed after a crash of this primary becomes the next state. */
  rebase(v: Int32Array): void {
    for (let s = 0; s < v.length; s++) this.set(s, v[s]!);
    this.record();
  }

  /** Largest state index equal to v, or -1. */
  prefixIndex(v: Int32Array): number {
    const l = this.states.get(vectorKey(v));
    return l ? l[l.length - 1]! : -1;
  }

  /** Position of id in sector s's history (-1: the sector never held it). */
  private position(s: number, id: number): number {
    const ids = this.hist[s]!.ids;
    for (let i = ids.length - 1; i >= 0; i--) if (ids[i] === id) return i;
    return -1;
  }

  /**
   * Why v is not a state of this timeline that holds every write in `required`, or null
   * when it is one. prefix: v must equal one state; otherwise (a partial set) each sector
   * must hold a value it held at some time, not older than the required writes'.
   */
  explain(v: Int32Array, required: WriteRecord[], prefix: boolean): string | null {
    const needIndex = required.reduce((m, w) => Math.max(m, w.index), 0);
    if (prefix) {
      const k = this.prefixIndex(v);
      if (k >= 0 && k >= needIndex) return null;
      if (k >= 0) return `content equals state ${k} of ${this.label}, older than state ${needIndex} (write ${this.writeAt(needIndex)?.id}); missing: ${this.missing(v, required)}`;
      return `content is no state of ${this.label}: ${this.describeDiff(v)}`;
    }
    for (let s = 0; s < v.length; s++) {
      if (this.position(s, v[s]!) < 0) return `sector ${s} holds ${v[s]}, never a value of it in ${this.label} (now ${this.current[s]})`;
    }
    const missing = this.missing(v, required);
    return missing ? `missing: ${missing}` : null;
  }

  private writeAt(index: number): WriteRecord | undefined {
    return this.writes.find((w) => w.index === index);
  }

  /** Required writes whose sectors hold something older than them. */
  private missing(v: Int32Array, required: WriteRecord[]): string {
    const out: string[] = [];
    const need = new Map<number, number>(); // sector → latest required state index touching it
    for (const w of required) for (let s = w.first; s < w.first + w.count; s++) need.set(s, Math.max(need.get(s) ?? 0, w.index));
    for (const [s, idx] of need) {
      const hs = this.hist[s]!;
      // The value the sector had at state idx:
      let i = 0;
      while (i + 1 < hs.at.length && hs.at[i + 1]! <= idx) i++;
      const p = this.position(s, v[s]!);
      if (p < i) {
        const w = this.byId.get(hs.ids[i]!);
        out.push(`sector ${s} holds ${v[s]} instead of write ${hs.ids[i]}${w ? ` (issued ${w.issuedAtMs}, acked ${w.ackedAtMs})` : ''}`);
        if (out.length >= 4) break;
      }
    }
    return out.join('; ');
  }

  describeDiff(v: Int32Array, max = 4): string {
    const out: string[] = [];
    for (let s = 0; s < v.length && out.length < max; s++) if (v[s] !== this.current[s]) out.push(`sector ${s}: ${v[s]} (now ${this.current[s]})`);
    return out.length ? out.join(', ') : 'equal to the current state';
  }

  /** Writes acknowledged strictly before t (all acknowledged ones when t is null). */
  ackedBefore(t: number | null): WriteRecord[] {
    return this.writes.filter((w) => w.ackedAtMs !== null && (t === null || w.ackedAtMs < t));
  }
}

/** Sectors where a and b differ (first few), for messages. */
export function diffSectors(a: Int32Array, b: Int32Array, max = 4): string {
  const out: string[] = [];
  for (let s = 0; s < Math.max(a.length, b.length) && out.length < max; s++) if (a[s] !== b[s]) out.push(`sector ${s}: ${a[s]} vs ${b[s]}`);
  return out.join(', ');
}
