// Why: dependencies point one way (README "Source layout"): the storage formats below the
// volume engine must not reach up into it, or a change to the engine's limits could change
// an on-disk format unnoticed. The repository has no lint step, so the rule is a test.
import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';

const SRC = path.resolve(import.meta.dirname, '../../src');

/** Layers each lower-layer directory may import from (itself included). */
const allowed: Record<string, string[]> = {
  util: ['util'],
  bitmap: ['util', 'bitmap'],
  snapshot: ['util', 'bitmap', 'snapshot'],
};

function importsOf(file: string): string[] {
  const text = fs.readFileSync(file, 'utf8');
  // import … from './x', export … from './x', import './x', import('./x')
  return [...text.matchAll(/(?:\bfrom\s+|\bimport\s*\(?\s*)['"](\.[^'"]+)['"]/g)].map((m) => m[1]!);
}

describe('layering', () => {
  for (const [dir, layers] of Object.entries(allowed)) {
    it(`src/${dir}/ imports only from ${layers.join(', ')}`, () => {
      const bad: string[] = [];
      for (const name of fs.readdirSync(path.join(SRC, dir))) {
        if (!name.endsWith('.ts')) continue;
        const file = path.join(SRC, dir, name);
        for (const spec of importsOf(file)) {
          const layer = path.relative(SRC, path.resolve(path.dirname(file), spec)).split(path.sep)[0]!;
          if (!layers.includes(layer)) bad.push(`${dir}/${name} → ${spec}`);
        }
      }
      expect(bad).toEqual([]);
    });
  }
});
