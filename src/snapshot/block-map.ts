// Why: a snapshot's block map says where in its save area the before-image of a volume
// block lives (seed 001 FIG. 44: a hash table). Snapshots may hold millions of entries,
// so this is an open-addressing table over two Uint32Arrays (8 bytes an entry at ≤ 50%
// load) instead of a Map (~80 bytes an entry and a GC object per key).
//
// States of a table cell: empty (key EMPTY) or used (key = block, value = save slot).
// Entries are never removed (a snapshot's before-images only accumulate until it is
// deleted as a whole), so no tombstones are needed. Rules: used ≤ capacity / 2;
// capacity is a power of two; a block appears at most once.

import { assert, AssertionError } from '../util/assert.js';

const EMPTY = 0xffffffff;
const CAPACITY_MIN = 1024;

function hash(block: number): number {
  // Fibonacci hashing of a 32-bit key; callers mask to the capacity.
  return Math.imul(block, 0x9e3779b1) >>> 0;
}

export class BlockMap {
  private keys: Uint32Array;
  private values: Uint32Array;
  private mask: number;
  private used = 0;

  constructor(capacity = CAPACITY_MIN) {
    let c = CAPACITY_MIN;
    while (c < capacity) c *= 2;
    this.keys = new Uint32Array(c).fill(EMPTY);
    this.values = new Uint32Array(c);
    this.mask = c - 1;
  }

  get size(): number {
    return this.used;
  }

  /** Save slot of a block, or -1. */
  get(block: number): number {
    let i = hash(block) & this.mask;
    for (;;) {
      const k = this.keys[i]!;
      if (k === block) return this.values[i]!;
      if (k === EMPTY) return -1;
      i = (i + 1) & this.mask;
    }
  }

  /** Records a block's slot; a block is only ever recorded once. */
  insert(block: number, slot: number): void {
    assert(block >= 0 && block < EMPTY && slot >= 0 && slot <= 0xffffffff, 'block map key/value out of range');
    if ((this.used + 1) * 2 > this.keys.length) this.grow();
    let i = hash(block) & this.mask;
    for (;;) {
      const k = this.keys[i]!;
      if (k === block) throw new AssertionError(`block ${block} already in the block map`);
      if (k === EMPTY) break;
      i = (i + 1) & this.mask;
    }
    this.keys[i] = block;
    this.values[i] = slot;
    this.used++;
  }

  private grow(): void {
    const oldKeys = this.keys;
    const oldValues = this.values;
    this.keys = new Uint32Array(oldKeys.length * 2).fill(EMPTY);
    this.values = new Uint32Array(oldKeys.length * 2);
    this.mask = this.keys.length - 1;
    this.used = 0;
    for (let i = 0; i < oldKeys.length; i++) if (oldKeys[i] !== EMPTY) this.insert(oldKeys[i]!, oldValues[i]!);
  }

  bytesUsed(): number {
    return this.keys.byteLength + this.values.byteLength;
  }
}
