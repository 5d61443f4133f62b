// Why: one vitest configuration for unit, property, interop and fuzz tests. Interop
// tests start real daemons and real clients, so timeouts are generous and workers few
// (the machines have 2 cores).
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 60_000,
    pool: 'forks',
    maxWorkers: 2,
    reporters: ['default'],
  },
});
