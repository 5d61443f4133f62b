// Why: crash safety is a claim about what survives when unsynced writes are lost or
// torn. This in-memory DurableFs keeps, per file, the durable bytes and the writes since
// the last sync; crash(rng) keeps a random subset of those writes (a later write to the same bytes still wins, as in the page cache), tears
// some of them at 512-byte sector boundaries, and returns a fresh file system holding
// only what a real disk could hold after a power cut. A sync may also be made to fail
// (syncFaults) the way Linux fails an fsync: the writes it covered are settled at once,
// whole, torn or lost, and no later sync writes them again, though reads still see them.

import type { DurableFile, DurableFs } from '../../src/util/durable-fs.js';

const SECTOR_BYTES = 512;

type Pending = { kind: 'write'; position: number; data: Buffer } | { kind: 'truncate'; sizeBytes: number };

class SimFileState {
  durable = Buffer.alloc(0);
  current = Buffer.alloc(0);
  pending: Pending[] = [];
}

function applyWrite(buf: Buffer, position: number, data: Buffer): Buffer {
  const end = position + data.length;
  if (end > buf.length) {
    const grown = Buffer.alloc(end);
    buf.copy(grown);
    buf = grown;
  }
  data.copy(buf, position);
  return buf;
}

function applyTruncate(buf: Buffer, sizeBytes: number): Buffer {
  if (sizeBytes <= buf.length) return Buffer.from(buf.subarray(0, sizeBytes));
  const grown = Buffer.alloc(sizeBytes);
  buf.copy(grown);
  return grown;
}

/** Each unsynced write reaches `buf` whole, torn at sector boundaries, or not at all. */
function settle(buf: Buffer, pending: Pending[], rng: () => number): Buffer {
  for (const p of pending) {
    const r = rng();
    if (r < 0.4) continue; // lost
    if (p.kind === 'truncate') {
      buf = applyTruncate(buf, p.sizeBytes);
      continue;
    }
    if (r < 0.6 && p.data.length > SECTOR_BYTES) {
      // torn: a random subset of its sectors reached the disk
      for (let s = 0; s < p.data.length; s += SECTOR_BYTES) {
        if (rng() < 0.5) buf = applyWrite(buf, p.position + s, p.data.subarray(s, Math.min(p.data.length, s + SECTOR_BYTES)));
      }
      continue;
    }
    buf = applyWrite(buf, p.position, p.data);
  }
  return buf;
}

export interface SyncFaults {
  /** Whether this sync of file `name` fails (EIO). */
  fails: (name: string) => boolean;
  /** Decides what the failed sync's writes left on the disk. */
  rng: () => number;
}

export class SimFs implements DurableFs {
  readonly files = new Map<string, SimFileState>();
  syncs = 0;
  writes = 0;
  syncFailures = 0;
  /** Fault injection for sync(); null: every sync succeeds. Not carried over by crash(). */
  syncFaults: SyncFaults | null = null;

  open(name: string, create: boolean): DurableFile {
    let st = this.files.get(name);
    if (!st) {
      if (!create) throw Object.assign(new Error(`ENOENT: ${name}`), { code: 'ENOENT' });
      st = new SimFileState();
      this.files.set(name, st); // creation is durable (the real one fsyncs the directory)
    }
    const state = st;
    const fsys = this;
    return {
      name,
      sizeBytes: () => state.current.length,
      read(position, target, offset, length) {
        const n = Math.max(0, Math.min(length, state.current.length - position));
        if (n > 0) state.current.copy(target as Buffer, offset, position, position + n);
        return n;
      },
      write(position, source, offset, length) {
        const data = Buffer.from(source.subarray(offset, offset + length));
        state.current = applyWrite(state.current, position, data);
        state.pending.push({ kind: 'write', position, data });
        fsys.writes++;
      },
      truncate(sizeBytes) {
        state.current = applyTruncate(state.current, sizeBytes);
        state.pending.push({ kind: 'truncate', sizeBytes });
      },
      async sync() {
        // Like fsync: covers the writes issued before the call, and takes time, so a crash
        // while it runs may keep or lose them.
        const covered = state.pending.length;
        await new Promise<void>((r) => setImmediate(r));
        if (fsys.syncFaults?.fails(name)) {
          state.durable = settle(state.durable, state.pending.slice(0, covered), fsys.syncFaults.rng);
          state.pending = state.pending.slice(covered);
          fsys.syncFailures++;
          throw Object.assign(new Error(`EIO: fsync ${name}`), { code: 'EIO' });
        }
        for (const p of state.pending.slice(0, covered)) {
          state.durable = p.kind === 'write' ? applyWrite(state.durable, p.position, p.data) : applyTruncate(state.durable, p.sizeBytes);
        }
        state.pending = state.pending.slice(covered);
        fsys.syncs++;
      },
      close() {},
    };
  }

  exists(name: string): boolean {
    return this.files.has(name);
  }
  remove(name: string): void {
    this.files.delete(name);
  }
  /** Atomic and durable at once (the real one syncs the directory); pending writes move along. */
  rename(from: string, to: string): void {
    const st = this.files.get(from);
    if (!st) throw Object.assign(new Error(`ENOENT: ${from}`), { code: 'ENOENT' });
    this.files.delete(from);
    this.files.set(to, st);
  }
  writeAtomic(name: string, data: Uint8Array): void {
    const st = this.files.get(name) ?? new SimFileState();
    st.durable = Buffer.from(data);
    st.current = Buffer.from(data);
    st.pending = [];
    this.files.set(name, st);
  }
  readAll(name: string): Buffer | null {
    const st = this.files.get(name);
    return st ? Buffer.from(st.current) : null;
  }
  list(): string[] {
    return [...this.files.keys()];
  }

  /** Everything synced stays; each unsynced write survives whole, torn, or not at all. */
  crash(rng: () => number): SimFs {
    const out = new SimFs();
    for (const [name, st] of this.files) {
      const buf = settle(Buffer.from(st.durable), st.pending, rng);
      const ns = new SimFileState();
      ns.durable = buf;
      ns.current = Buffer.from(buf);
      out.files.set(name, ns);
    }
    return out;
  }
}
