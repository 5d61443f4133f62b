// Why: a primary may stream to two sync pairs at once (or a sync pair and another pair's
// handover), and the engine holds one mirror: each stream must hear every write and cut,
// and a reply must wait for all of them. When only the newest stream was set as the mirror,
// the other never saw a cut and cut empty sets forever (simulator seed 1619600543).
import { describe, expect, it } from 'vitest';
import { fanOut, type WriteMirror } from '../../src/volume/write-mirror.js';

function recorder(name: string, log: string[], opts: { write?: () => Promise<void> | undefined; refuse?: boolean } = {}): WriteMirror {
  return {
    admit: () => {
      if (opts.refuse) throw Object.assign(new Error(`${name} refuses`), { code: 'EIO' });
    },
    write: (offset) => {
      log.push(`${name} write ${offset}`);
      return opts.write?.();
    },
    zero: (offset, length) => {
      log.push(`${name} zero ${offset}+${length}`);
      return undefined;
    },
    flush: () => {
      log.push(`${name} flush`);
      return undefined;
    },
    cut: (n) => void log.push(`${name} cut ${n}`),
    committed: (n) => void log.push(`${name} committed ${n}`),
    aborted: (n) => void log.push(`${name} aborted ${n}`),
  };
}

describe('fanOut: one mirror for several', () => {
  it('is null for none and the mirror itself for one', () => {
    const m = recorder('a', []);
    expect(fanOut([])).toBeNull();
    expect(fanOut([m])).toBe(m);
  });

  it('tells every mirror every write, zeroing, flush, cut, commit and abort, in order', () => {
    const log: string[] = [];
    const f = fanOut([recorder('a', log), recorder('b', log)])!;
    f.admit();
    expect(f.write(4096, [Buffer.alloc(1)])).toBeUndefined();
    f.zero(0, 512, false);
    f.cut(7);
    f.committed(7);
    f.aborted(8);
    f.flush();
    expect(log).toEqual(['a write 4096', 'b write 4096', 'a zero 0+512', 'b zero 0+512', 'a cut 7', 'b cut 7', 'a committed 7', 'b committed 7', 'a aborted 8', 'b aborted 8', 'a flush', 'b flush']);
  });

  it('settles only when every mirror has, and answers with the first failure', async () => {
    let releaseB: () => void = () => undefined;
    const b = new Promise<void>((r) => (releaseB = r));
    const f = fanOut([recorder('a', [], { write: () => Promise.reject(Object.assign(new Error('a failed'), { code: 'EIO' })) }), recorder('b', [], { write: () => b })])!;
    let settled = false;
    const p = f.write(0, [Buffer.alloc(1)])!.then(
      () => (settled = true),
      (e: Error) => {
        settled = true;
        throw e;
      },
    );
    await new Promise((r) => setTimeout(r, 10));
    expect(settled, 'waits for b although a failed').toBe(false);
    releaseB();
    await expect(p).rejects.toThrow('a failed');
  });

  it('refuses a write when any mirror refuses', () => {
    const f = fanOut([recorder('a', []), recorder('b', [], { refuse: true })])!;
    expect(() => f.admit()).toThrow('b refuses');
  });
});
