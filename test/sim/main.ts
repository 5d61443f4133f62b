// Why: scripts/sim's program: parses `--seed N --count N --verbose --logs --wall S`, runs
// the batch (run.ts) and exits non-zero on any failing seed. Bundled by scripts/sim so it
// runs under plain node, without the test runner's start-up cost.

import { randomInt } from 'node:crypto';
import { runBatch } from './run.js';
import { KNOWN_ISSUES, OPEN_ISSUES } from './scenario.js';
import { eventSites } from './time.js';

const HELP = `Usage: scripts/sim [options]

  --seed N        first seed (default: random, or DELTAVOL_SEED); printed as [seed] ...
  --count N       scenarios to run (default 1000; 1 with --seed)
  --wall SECONDS  stop starting scenarios after this long (default 3600)
  --jobs N        split the seeds over N processes (scripts/sim only)
  --verbose       print each failing scenario's whole trace
  --logs          with --verbose: the daemons' own log lines too
  --known all|CLASS,...   tolerate these known failure classes (look for new ones)
  --no-determinism-check  skip replaying the first seed to check determinism
  -h, --help      this help`;
const flags = new Set(['--verbose', '--logs', '--no-determinism-check']);
const valued = new Set(['--seed', '--count', '--wall', '--known']);
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i]!;
  if (a === '-h' || a === '--help') {
    console.log(HELP);
    process.exit(0);
  }
  if (valued.has(a)) {
    if (i + 1 >= process.argv.length) {
      console.error(`sim: ${a} needs a value (see --help)`);
      process.exit(2);
    }
    i++;
  } else if (!flags.has(a)) {
    console.error(`sim: unknown option ${a} (see --help)`);
    process.exit(2);
  }
}

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const seedArg = arg('--seed') ?? process.env.DELTAVOL_SEED;
const firstSeed = seedArg !== undefined ? Number(seedArg) : randomInt(2 ** 31);
const count = Number(arg('--count') ?? (seedArg !== undefined ? 1 : 1000));
const wallS = Number(arg('--wall') ?? 3600);
for (const [name, v] of [['--seed', firstSeed], ['--count', count], ['--wall', wallS]] as const) {
  if (!Number.isInteger(v) || v < (name === '--seed' ? 0 : 1)) {
    console.error(`sim: ${name} must be a whole number${name === '--seed' ? '' : ' of at least 1'}, not ${name === '--seed' ? seedArg : arg(name)}`);
    process.exit(2);
  }
}
const verbose = process.argv.includes('--verbose');
const logs = process.argv.includes('--logs');
// --known all | CLASS,CLASS: failure classes already reported, tolerated so a soak looks for new ones.
const knownArg = arg('--known') ?? '';
const known = new Set(knownArg === 'all' ? OPEN_ISSUES : knownArg.split(',').filter(Boolean));
for (const k of known) if (!(k in KNOWN_ISSUES)) throw new Error(`--known: no class ${k} (classes: ${Object.keys(KNOWN_ISSUES).join(', ')})`);

console.log(`[seed] sim: DELTAVOL_SEED=${firstSeed} (seeds ${firstSeed}..${firstSeed + count - 1})`);
const r = await runBatch({ firstSeed, count, wallMsMax: wallS * 1000, verbose, logs, known, checkDeterminism: !process.argv.includes('--no-determinism-check'), print: (l) => console.log(l) });
const t = r.totals;
console.log(
  `sim: ${r.runs} scenarios in ${(r.wallMs / 1000).toFixed(1)} s wall (${r.perSecond.toFixed(1)}/s, ${Math.round(r.perSecond * 60)}/min; ${(r.cpuMs / 1000).toFixed(1)} s CPU, ${Math.round(r.perCpuSecond * 60)}/CPU-min), ` +
    `${r.failed.length} failed, deterministic ${r.deterministic ?? 'not checked'}; ` +
    `virtual ${((t.virtualMs ?? 0) / 1000).toFixed(0)} s, events ${t.events ?? 0}, writes acked ${t.writesAcked ?? 0}, crashes ${t.crashes ?? 0}, ` +
    `failovers ${t.failovers ?? 0}, takeovers ${t.takeovers ?? 0}, resyncs ${t.resyncs ?? 0} (full ${t.fullResyncs ?? 0}), cut --snapshot refused ${t.cutSnapshotsRefused ?? 0}, converged ${t.convergedRuns ?? 0}`,
);
for (const [k, seeds] of r.known) console.log(`known issue ${k} (${known.has(k) && !KNOWN_ISSUES[k]!.fixedIn ? 'tolerated' : 'failing'}) in ${seeds.length} runs, e.g. seeds ${seeds.slice(0, 5).join(' ')}: ${KNOWN_ISSUES[k]!.what}`);
for (const [g, seeds] of r.gaps) console.log(`gap (${seeds.length} runs, e.g. seed ${seeds[0]}): ${g}`);
if (r.failed.length > 0) console.log(`failing seeds: ${r.failed.map((f) => f.seed).join(' ')}`);
if (process.env.SIM_DEBUG_STACKS) for (const [k, v] of [...eventSites].sort((a, b) => b[1] - a[1]).slice(0, 25)) console.log(v, k);
process.exit(r.failed.length > 0 || r.deterministic === false ? 1 : 0);
