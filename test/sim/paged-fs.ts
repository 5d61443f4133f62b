// Why: the simulator crashes nodes thousands of times a minute, and every node holds a
// 4 MiB outbound log (its minimum size) beside small metadata files. test/helpers' SimFs
// keeps each file as one Buffer, so a crash copies every file whole and a growing file is
// copied at every append; profiling showed the simulator spending most of its time there.
// PagedFs has SimFs's crash model exactly (a file's durable image plus the writes since
// its last sync; at a crash each unsynced write survives whole, torn at 512-byte sectors,
// or not at all; creation, removal and atomic replacement are durable at once; a sync
// covers the writes issued before it was called) over 4 KiB copy-on-write pages, so a
// crash costs a map copy and a write costs its own bytes. Its sync waits on `syncDelay`
// (the simulated disk latency, in virtual time).

import type { DurableFile, DurableFs } from '../../src/util/durable-fs.js';

const PAGE = 4096;
const SECTOR_BYTES = 512;

/** One version of a file: pages shared with other images until written (copy on write). */
class Image {
  size = 0;
  pages = new Map<number, Buffer>();
  private owned = new Set<number>();

  /** A copy sharing every page; neither side owns them any more. */
  clone(): Image {
    const c = new Image();
    c.size = this.size;
    c.pages = new Map(this.pages);
    this.owned.clear();
    return c;
  }

  private writable(p: number): Buffer {
    let b = this.pages.get(p);
    if (!b) {
      b = Buffer.alloc(PAGE);
      this.pages.set(p, b);
      this.owned.add(p);
    } else if (!this.owned.has(p)) {
      b = Buffer.from(b);
      this.pages.set(p, b);
      this.owned.add(p);
    }
    return b;
  }

  write(position: number, data: Buffer): void {
    let done = 0;
    while (done < data.length) {
      const at = position + done;
      const p = Math.floor(at / PAGE);
      const o = at - p * PAGE;
      const n = Math.min(PAGE - o, data.length - done);
      data.copy(this.writable(p), o, done, done + n);
      done += n;
    }
    this.size = Math.max(this.size, position + data.length);
  }

  truncate(size: number): void {
    if (size < this.size) {
      for (const p of [...this.pages.keys()]) {
        if (p * PAGE >= size) {
          this.pages.delete(p);
          this.owned.delete(p);
        }
      }
      const last = Math.floor(size / PAGE);
      const o = size - last * PAGE;
      if (o > 0 && this.pages.has(last)) this.writable(last).fill(0, o);
    }
    this.size = size;
  }

  read(position: number, target: Uint8Array, offset: number, length: number): number {
    const n = Math.max(0, Math.min(length, this.size - position));
    let done = 0;
    while (done < n) {
      const at = position + done;
      const p = Math.floor(at / PAGE);
      const o = at - p * PAGE;
      const k = Math.min(PAGE - o, n - done);
      const b = this.pages.get(p);
      if (b) target.set(b.subarray(o, o + k), offset + done);
      else target.fill(0, offset + done, offset + done + k);
      done += k;
    }
    return n;
  }

  all(): Buffer {
    const b = Buffer.alloc(this.size);
    this.read(0, b, 0, this.size);
    return b;
  }
}

type Pending = { kind: 'write'; position: number; data: Buffer } | { kind: 'truncate'; sizeBytes: number };

class FileState {
  durable = new Image();
  current = new Image();
  pending: Pending[] = [];
}

function apply(img: Image, p: Pending): void {
  if (p.kind === 'write') img.write(p.position, p.data);
  else img.truncate(p.sizeBytes);
}

/** As SimFs's settle(): each unsynced write reaches the image whole, torn at sector boundaries, or not at all. */
function settle(img: Image, pending: Pending[], rng: () => number): void {
  for (const p of pending) {
    const r = rng();
    if (r < 0.4) continue; // lost
    if (p.kind === 'truncate') {
      img.truncate(p.sizeBytes);
      continue;
    }
    if (r < 0.6 && p.data.length > SECTOR_BYTES) {
      for (let s = 0; s < p.data.length; s += SECTOR_BYTES) {
        if (rng() < 0.5) img.write(p.position + s, p.data.subarray(s, Math.min(p.data.length, s + SECTOR_BYTES)));
      }
      continue;
    }
    img.write(p.position, p.data);
  }
}

export class PagedFs implements DurableFs {
  private readonly files = new Map<string, FileState>();
  /** The disk's sync latency (set by the simulator; resolves at once by default). */
  syncDelay: () => Promise<void> = () => Promise.resolve();

  open(name: string, create: boolean): DurableFile {
    let st = this.files.get(name);
    if (!st) {
      if (!create) throw Object.assign(new Error(`ENOENT: ${name}`), { code: 'ENOENT' });
      st = new FileState();
      this.files.set(name, st); // creation is durable (the real one fsyncs the directory)
    }
    const state = st;
    const fsys = this;
    return {
      name,
      sizeBytes: () => state.current.size,
      read: (position, target, offset, length) => state.current.read(position, target, offset, length),
      write(position, source, offset, length) {
        const data = Buffer.from(source.subarray(offset, offset + length));
        state.current.write(position, data);
        state.pending.push({ kind: 'write', position, data });
      },
      truncate(sizeBytes) {
        state.current.truncate(sizeBytes);
        state.pending.push({ kind: 'truncate', sizeBytes });
      },
      async sync() {
        // Covers the writes issued before the call; takes time (a crash may come first).
        // Syncs may overlap and end in any order: each applies only what is still pending.
        const covered = new Set(state.pending);
        await fsys.syncDelay();
        for (const p of state.pending) if (covered.has(p)) apply(state.durable, p);
        state.pending = state.pending.filter((p) => !covered.has(p));
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
    const st = new FileState();
    st.durable.write(0, Buffer.from(data));
    st.current = st.durable.clone();
    this.files.set(name, st);
  }
  readAll(name: string): Buffer | null {
    const st = this.files.get(name);
    return st ? st.current.all() : null;
  }
  list(): string[] {
    return [...this.files.keys()];
  }

  /** Everything synced stays; each unsynced write survives whole, torn, or not at all. */
  crash(rng: () => number): PagedFs {
    const out = new PagedFs();
    for (const [name, st] of this.files) {
      const img = st.durable.clone();
      settle(img, st.pending, rng);
      const ns = new FileState();
      ns.durable = img;
      ns.current = img.clone();
      out.files.set(name, ns);
    }
    return out;
  }
}
