// Why: the simulator's two entry points (the vitest file and scripts/sim) share one loop:
// run seeds one after another within a count and a wall-time budget, print every failing
// seed with the line that replays it, and measure scenarios per second. The wall clock is
// read here only, for budgets and rates; nothing inside a run depends on it.

import { runScenario, type ScenarioResult } from './scenario.js';

export interface BatchOptions {
  firstSeed: number;
  count: number;
  /** Stop starting new runs after this much wall time (ms). */
  wallMsMax: number;
  verbose: boolean;
  logs: boolean;
  /**
   * Run the first seed again right away, and at the end the last seed and one from the
   * middle (after many other runs in this process), comparing trace hashes.
   */
  checkDeterminism: boolean;
  /** Failure classes tolerated (KNOWN_ISSUES keys): counted, not failing. */
  known: ReadonlySet<string>;
  print: (line: string) => void;
}

export interface BatchResult {
  runs: number;
  failed: ScenarioResult[];
  wallMs: number;
  cpuMs: number;
  perSecond: number;
  perCpuSecond: number;
  deterministic: boolean | null;
  totals: Record<string, number>;
  gaps: Map<string, number[]>;
  /** Known failure classes hit: class → seeds. */
  known: Map<string, number[]>;
}

const wallNow = () => Number(process.hrtime.bigint() / 1_000_000n);

export function reproduce(seed: number): string {
  return `reproduce with DELTAVOL_SEED=${seed} (scripts/sim --seed ${seed} --count 1 --verbose)`;
}

export function formatFailure(r: ScenarioResult, withTrace: boolean): string {
  const lines = [`FAIL seed ${r.seed}: ${reproduce(r.seed)}`, ...r.failures.map((f) => `  ${f}`)];
  if (withTrace) lines.push('  trace:', ...r.trace.map((l) => `    ${l}`));
  else lines.push('  last steps:', ...r.trace.filter((l) => !l.startsWith('      ')).slice(-25).map((l) => `    ${l}`));
  return lines.join('\n');
}

export async function runBatch(o: BatchOptions): Promise<BatchResult> {
  const started = wallNow();
  const cpu0 = process.cpuUsage();
  const failed: ScenarioResult[] = [];
  const totals: Record<string, number> = {};
  const gaps = new Map<string, number[]>();
  const known = new Map<string, number[]>();
  let runs = 0;
  const hashes = new Map<number, string>();
  let deterministic: boolean | null = null;
  let unhandled: Error | null = null;
  const onUnhandled = (e: unknown) => {
    unhandled ??= e instanceof Error ? e : new Error(String(e));
  };
  process.on('unhandledRejection', onUnhandled);
  try {
    for (let i = 0; i < o.count; i++) {
      if (i > 0 && wallNow() - started > o.wallMsMax) break;
      const seed = (o.firstSeed + i) >>> 0;
      const t0 = wallNow();
      const r = await runScenario(seed, { logs: o.logs, known: o.known });
      // An unhandled rejection would have killed a real daemon.
      await new Promise((res) => setImmediate(res));
      if (unhandled) {
        const e = unhandled as Error;
        r.ok = false;
        r.failures.push(`unhandled promise rejection: ${e.stack ?? e.message}`);
        unhandled = null;
      }
      runs++;
      hashes.set(seed, r.traceHash);
      for (const [k, v] of Object.entries(r.stats)) if (typeof v === 'number') totals[k] = (totals[k] ?? 0) + v;
      totals.convergedRuns = (totals.convergedRuns ?? 0) + (r.stats.converged ? 1 : 0);
      for (const g of r.gaps) gaps.set(g, [...(gaps.get(g) ?? []), seed]);
      for (const k of Object.keys(r.known)) known.set(k, [...(known.get(k) ?? []), seed]);
      if (i === 0 && o.checkDeterminism) {
        const again = await runScenario(seed, { logs: false, known: o.known });
        deterministic = again.traceHash === r.traceHash;
        if (!deterministic) o.print(`NONDETERMINISTIC: seed ${seed} gave trace ${r.traceHash} then ${again.traceHash}`);
      }
      if (process.env.SIM_PERF) o.print(`perf seed ${seed}: ${wallNow() - t0} ms, ${r.stats.events} events, ${r.stats.settleRounds} rounds, ${r.stats.writesIssued} writes, ${r.stats.crashes} crashes, ${(r.stats.virtualMs / 1000).toFixed(0)} s virtual, ${r.trace.length} trace lines`);
      if (process.env.SIM_MEM && i % 10 === 0) o.print(`mem after ${i + 1}: heap ${(process.memoryUsage().heapUsed / 1e6).toFixed(0)} MB rss ${(process.memoryUsage().rss / 1e6).toFixed(0)} MB`);
      if (o.verbose) {
        o.print(r.trace.join('\n'));
        o.print(`seed ${seed}: ${r.ok ? 'ok' : 'FAILED'} trace ${r.traceHash} (${wallNow() - t0} ms wall, ${(r.stats.virtualMs / 1000).toFixed(1)} s virtual, ${r.stats.events} events) ${JSON.stringify(r.stats)}`);
      }
      if (!r.ok) {
        failed.push(r);
        o.print(formatFailure(r, false));
      }
    }
  } finally {
    process.off('unhandledRejection', onUnhandled);
  }
  if (o.checkDeterminism && runs > 2) {
    // Replays after other runs in the same process: state leaking between runs shows here.
    for (const seed of [(o.firstSeed + runs - 1) >>> 0, (o.firstSeed + Math.floor(runs / 2)) >>> 0]) {
      const a = hashes.get(seed);
      const again = await runScenario(seed, { logs: false, known: o.known });
      if (a !== undefined && again.traceHash !== a) {
        deterministic = false;
        o.print(`NONDETERMINISTIC: seed ${seed} gave trace ${a} in the batch and ${again.traceHash} when replayed at its end`);
      }
    }
  }
  const wallMs = wallNow() - started;
  const c = process.cpuUsage(cpu0);
  const cpuMs = (c.user + c.system) / 1000;
  return { runs, failed, wallMs, cpuMs, perSecond: (runs * 1000) / Math.max(1, wallMs), perCpuSecond: (runs * 1000) / Math.max(1, cpuMs), deterministic, totals, gaps, known };
}
