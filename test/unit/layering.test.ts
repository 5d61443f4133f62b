// Why: dependencies point one way (STYLE.md "A layout these suggest", README "Source
// layout"): the storage formats below the volume engine must not reach up into it; the
// volume knows nothing of NBD or replication; replication and recovery see volumes
// through small interfaces and know nothing of the daemon, the CLI or NBD; and no two
// files import each other, directly or through others (an import cycle is how two
// objects end up sharing one piece of state). The repository has no lint step, so the
// rules are a test.
import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';

const SRC = path.resolve(import.meta.dirname, '../../src');

/** Layers each directory may import from (itself included). */
const allowed: Record<string, string[]> = {
  util: ['util'],
  bitmap: ['util', 'bitmap'],
  snapshot: ['util', 'bitmap', 'snapshot'],
  changelog: ['util', 'bitmap', 'changelog'],
  storage: ['util', 'storage'],
  volume: ['util', 'bitmap', 'changelog', 'snapshot', 'storage', 'volume'],
  nbd: ['util', 'nbd'],
  server: ['util', 'nbd', 'server'],
  replication: ['util', 'bitmap', 'snapshot', 'volume', 'recovery', 'replication'],
  recovery: ['util', 'bitmap', 'volume', 'replication', 'recovery'],
};

function importsOf(file: string): string[] {
  const text = fs.readFileSync(file, 'utf8');
  // import … from './x', export … from './x', import './x', import('./x')
  return [...text.matchAll(/(?:\bfrom\s+|\bimport\s*\(?\s*)['"](\.[^'"]+)['"]/g)].map((m) => m[1]!);
}

function sourceFiles(dir = SRC): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? sourceFiles(path.join(dir, e.name)) : e.name.endsWith('.ts') ? [path.join(dir, e.name)] : []));
}

/** The .ts file an import of `spec` from `file` names. */
function target(file: string, spec: string): string {
  return path.resolve(path.dirname(file), spec).replace(/\.js$/, '.ts');
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

  it('no import cycles between files (type imports included)', () => {
    const graph = new Map<string, string[]>();
    for (const f of sourceFiles()) graph.set(f, importsOf(f).map((s) => target(f, s)).filter((t) => t.startsWith(SRC)));
    const state = new Map<string, 'open' | 'done'>();
    const cycles: string[] = [];
    const stack: string[] = [];
    const visit = (f: string) => {
      state.set(f, 'open');
      stack.push(f);
      for (const t of graph.get(f) ?? []) {
        if (state.get(t) === 'open') cycles.push([...stack.slice(stack.indexOf(t)), t].map((x) => path.relative(SRC, x)).join(' → '));
        else if (!state.has(t)) visit(t);
      }
      stack.pop();
      state.set(f, 'done');
    };
    for (const f of graph.keys()) if (!state.has(f)) visit(f);
    expect(cycles).toEqual([]);
  });
});
