// Why: in a cascade A → B → C (seed 002) each node sees only its neighbours, yet the
// operator on any of them must see the whole chain (issue 13: `status` on each node shows
// it). So each node passes what it knows one hop on: a replica tells its primary about its
// own replicas (and what they told it), a primary that is itself a replica tells its
// replicas about its primary (and further up). A hop is a small, validated record; the
// lists are bounded so a peer cannot make another node store much.

export interface ChainHop {
  /** 1: the neighbour; 2: the neighbour's neighbour; ... */
  depth: number;
  volume: string;
  /** Where the node is, as the reporting node reaches it (host:port), or '' when unknown. */
  peer: string;
  role: string;
  /** Its pair's state as the node on the near side sees it (duplex, disconnected, ...). */
  state: string;
  generation: number;
  playedSet: number | null;
  lagSeconds: number | null;
  /** Depth 1 from a cascade's middle: its pair's id, and the set of the middle's primary that replica holds whole (null: unknown). */
  pairId?: string;
  upstreamSet?: number | null;
}

/** A chain report carries at most this many hops (a deeper cascade is cut off there)... */
export const chainHopsMax = 16;
/** ...in at most this many bytes of JSON. */
export const chainBytesMax = 8 * 1024;

const text = (v: unknown, max: number): v is string => typeof v === 'string' && v.length <= max;
const count = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

export function encodeHops(hops: readonly ChainHop[]): string {
  const out: ChainHop[] = [];
  for (const h of hops) {
    if (out.length >= chainHopsMax) break;
    out.push(h);
    if (JSON.stringify(out).length > chainBytesMax) {
      out.pop();
      break;
    }
  }
  return JSON.stringify(out);
}

/** The hops of a report, or null when it is malformed (too long, a bad field). */
export function decodeHops(s: string): ChainHop[] | null {
  if (s.length > chainBytesMax) return null;
  let v: unknown;
  try {
    v = JSON.parse(s);
  } catch {
    return null;
  }
  if (!Array.isArray(v) || v.length > chainHopsMax) return null;
  const out: ChainHop[] = [];
  for (const x of v as unknown[]) {
    if (typeof x !== 'object' || x === null) return null;
    const h = x as Record<string, unknown>;
    if (!count(h.depth) || h.depth < 1 || h.depth > chainHopsMax) return null;
    if (!text(h.volume, 256) || !text(h.peer, 300) || !text(h.role, 32) || !text(h.state, 64) || !count(h.generation)) return null;
    if (h.playedSet !== null && !count(h.playedSet)) return null;
    if (h.lagSeconds !== null && !(typeof h.lagSeconds === 'number' && Number.isFinite(h.lagSeconds) && h.lagSeconds >= 0)) return null;
    if (h.pairId !== undefined && !(typeof h.pairId === 'string' && /^[0-9a-f]{12}$/.test(h.pairId))) return null;
    if (h.upstreamSet !== undefined && h.upstreamSet !== null && !count(h.upstreamSet)) return null;
    out.push({
      depth: h.depth,
      volume: h.volume,
      peer: h.peer,
      role: h.role,
      state: h.state,
      generation: h.generation,
      playedSet: h.playedSet as number | null,
      lagSeconds: h.lagSeconds as number | null,
      ...(h.pairId !== undefined ? { pairId: h.pairId, upstreamSet: (h.upstreamSet as number | null | undefined) ?? null } : {}),
    });
  }
  return out;
}

/** The hops a neighbour reported, one hop further from here. */
export function deeper(hops: readonly ChainHop[]): ChainHop[] {
  return hops.filter((h) => h.depth < chainHopsMax).map((h) => ({ ...h, depth: h.depth + 1 }));
}
