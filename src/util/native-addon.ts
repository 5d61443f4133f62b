// Why: the C addons (src/native/*.c, built by `npm run build` into build/Release/) are each
// optional: without one the daemon keeps Node's way of doing that thing. One loader, so
// every caller finds them the same way from dist/ and from src/.

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const loaded = new Map<string, unknown>();

/** The addon `name` (build/Release/<name>.node), or null when it was not built. */
export function loadAddon<T>(name: string): T | null {
  if (loaded.has(name)) return loaded.get(name) as T | null;
  const here = path.dirname(fileURLToPath(import.meta.url));
  const require = createRequire(import.meta.url);
  let addon: T | null;
  try {
    // dist/util/ or src/util/ → project root
    addon = require(path.resolve(here, `../../build/Release/${name}.node`)) as T;
  } catch {
    addon = null;
  }
  loaded.set(name, addon);
  return addon;
}
