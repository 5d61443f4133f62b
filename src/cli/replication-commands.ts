// Why: the replication words of the CLI (`replica add|list|remove|suspend|resume|cut`
// and the replication part of `status`), kept apart from main.ts so each file stays one
// concern. Like main.ts it only turns words into control-API requests and answers into
// text: a table for people, --json for scripts, a progress bar while an initial copy runs.

import type { Command } from 'commander';
import cliProgress from 'cli-progress';
import { DeltavolError } from '../util/errors.js';
import { formatBytes, parseDurationMs, parseSizeBytes } from '../util/units.js';
import type { ControlClient } from './control-client.js';
import { table } from './format.js';

export interface PairStatus {
  id: string;
  peer: string;
  remoteVolume: string;
  state: string;
  connected: boolean;
  reason: string | null;
  generation: number;
  ackedSet: number;
  playedSet: number;
  sets: { set: number; createdAt: string; blocks: number; bytes: number; partial: boolean; state: string }[];
  lagSeconds: number;
  rpo: { atRiskSinceMs: number | null; seconds: number };
  reasonCode: string | null;
  bytesDifferent: number;
  currentBytesPerSec: number;
  averageBytesPerSec: number;
  initialCopy: { kind: string; doneBytes: number; totalBytes: number; bytesPerSec: number; etaSeconds: number | null } | null;
  mode?: 'async' | 'sync';
  sync?: {
    fence: string;
    timeoutMs: number;
    stream: string;
    inSync: boolean;
    streamingSeconds: number | null;
    unacknowledged: number;
    lastBreak: { reason: string; at: string } | null;
    latency: { p50Us: number; p99Us: number } | null;
    writes: number;
    breaks: number;
    refused: number;
    released: number;
    failed: number;
  } | null;
}

/** A sync pair's word for the state column: whether writes wait for the replica now. */
function syncWord(p: PairStatus): string {
  if (!p.sync) return '';
  return p.sync.inSync ? ', sync' : `, sync: NOT in sync (${p.sync.fence === 'data' ? 'writes refused' : 'writes not waiting'})`;
}

export interface VolumeReplication {
  volume: string;
  role: 'primary' | 'replica' | 'simplex';
  state?: string;
  generation?: number;
  fenced?: { generation: number; peer: string; reason: string; overridden?: boolean } | null;
  failover?: { kind: string; restartSnapshot: string | null; restartSet: number; resyncPairId: string | null } | null;
  handover?: { newGeneration: number } | null;
  distant?: { volume: string; peer: string; confirmedSet: number; trackedFrom: number; differential: boolean; blocks: number }[];
  chain?: { position: 'upstream' | 'here' | 'downstream'; depth: number; volume: string; peer: string; role: string; state: string; generation: number; playedSet: number | null; lagSeconds: number | null }[];
  restore?: { state: string; snapshot?: string; temporary?: boolean; beforeSnapshot?: string; blocksDone?: number; blocksToCopy?: number; seconds?: number; error?: string | null } | null;
  rpo?: { atRiskSinceMs: number | null; seconds: number; lastContactMs: number | null };
  resync?: { full: boolean; registered: boolean; reason: string } | null;
  copy?: { kind: string; totalBytes: number; receivedBytes: number } | null;
  currentSet?: number;
  replicas?: PairStatus[];
  outbound?: { capacityBytes: number; usedBytes: number; full: boolean; sets: number };
  // replica side
  primaryVolume?: string;
  playedSet?: number;
  ackedSet?: number;
  lagSeconds?: number;
  connected?: boolean;
  consistent?: boolean;
  inboundBytes?: number;
  setsHeld?: { set: number; createdAt: string; blocks: number; bytes: number }[];
}

type Helpers = {
  client: (cmd: Command) => ControlClient;
  print: (json: boolean, value: unknown, human: () => string) => void;
};

const rate = (bps: number) => `${formatBytes(bps)}/s`;

/** A cascade as one line: `A v@host (primary) → [v here: replica duplex] → v@host (duplex, lag 0.2 s)`. */
export function chainText(chain: NonNullable<VolumeReplication['chain']>): string {
  return chain
    .map((h, i) => {
      if (h.position === 'here') return `[${h.volume} here: ${h.role} ${h.state}, generation ${h.generation}]`;
      const where = h.peer ? `${h.volume}@${h.peer}` : h.volume;
      const lag = h.lagSeconds === null ? '' : `, lag ${h.lagSeconds.toFixed(1)} s`;
      // Upstream, top first: the first is the primary, the others replicas that forward.
      if (h.position === 'upstream') return `${where} (${i === 0 ? 'primary' : 'replica, forwards'})`;
      return `${where} (${h.state}, set ${h.playedSet ?? '-'}${lag})`;
    })
    .join(' → ');
}

/** One line on a volume's restore from its replica (running, last, or interrupted). */
function restoreNote(volume: string, r: NonNullable<VolumeReplication['restore']>): string {
  const from = r.temporary ? "the replica's state" : r.snapshot ? `the replica's snapshot ${r.snapshot}` : 'the replica';
  switch (r.state) {
    case 'copying':
      return `${volume}: RESTORING from ${from}: ${r.blocksDone} of ${r.blocksToCopy} blocks; writes refused until it ends (state before: ${volume}@${r.beforeSnapshot})`;
    case 'failed':
      return `${volume}: restore from ${from} FAILED after ${r.blocksDone} of ${r.blocksToCopy} blocks (${r.error ?? 'unknown error'}); writes refused: \`deltavol restore ${volume} --from-replica\` again finishes it`;
    case 'interrupted':
      return `${volume}: restore from ${from} INTERRUPTED (the daemon stopped); writes refused: \`deltavol restore ${volume} --from-replica${r.snapshot ? ` --snapshot ${r.snapshot}` : ''}\` finishes it, \`--abandon\` gives up`;
    default:
      return `${volume}: restored from ${from} (${r.blocksToCopy} blocks in ${(r.seconds ?? 0).toFixed(2)} s); state before: ${volume}@${r.beforeSnapshot}`;
  }
}

/** The replication part of `status`: one table of pairs for primaries, one line per replica. */
export function renderReplication(vols: VolumeReplication[]): string {
  const rows: (string | number)[][] = [];
  const notes: string[] = [];
  for (const v of vols) {
    if (v.fenced?.overridden) notes.push(`${v.volume}: DIVERGED — unfenced by the operator although a newer primary (generation ${v.fenced.generation}) exists at ${v.fenced.peer}: two primaries, nothing ships. \`deltavol resync ${v.volume}\` rejoins it (its writes are kept in a snapshot).`);
    else if (v.fenced) notes.push(`${v.volume}: FENCED — a newer primary (generation ${v.fenced.generation}) exists at ${v.fenced.peer}; writes are refused. \`deltavol resync ${v.volume}\` makes it that primary's replica (only what differs travels).`);
    if (v.state === 'failed-over' && v.failover) notes.push(`${v.volume}: failed over (restart point ${v.failover.restartSnapshot ?? 'none'} = set ${v.failover.restartSet}); ${v.failover.resyncPairId ? 'the old primary is being resynced' : 'waiting for the old primary to resync'}`);
    if (v.handover) notes.push(`${v.volume}: planned handover to generation ${v.handover.newGeneration} under way: writes held`);
    if (v.restore) notes.push(restoreNote(v.volume, v.restore));
    for (const d of v.distant ?? []) {
      notes.push(
        d.differential
          ? `${v.volume}: ${d.volume}@${d.peer} (a replica of a replica) holds set ${d.confirmedSet}: if its middle is lost, \`deltavol resync ${d.volume} --peer THIS_NODE\` on it moves only the blocks changed since (${d.blocks} now)`
          : `${v.volume}: ${d.volume}@${d.peer} (a replica of a replica) has not confirmed a set since this node began tracking it (set ${d.trackedFrom}): if its middle were lost now, it would need a full copy`,
      );
    }
    // A cascade (more than one hop on some side): the whole chain, top first.
    if (v.chain && v.chain.some((h) => h.depth > 1)) notes.push(`${v.volume}: chain ${chainText(v.chain)}`);
    if (v.resync) notes.push(`${v.volume}: resyncing from its new primary${v.resync.full ? ` (FULL copy: ${v.resync.reason})` : ''}${v.resync.registered ? '' : ' — waiting for the new primary to record it'}`);
    if (v.role === 'primary') {
      if ((v.replicas ?? []).length === 0) rows.push([v.volume, 'primary', '', v.state ?? '', v.generation ?? 0, `${v.currentSet ?? '-'}/-/-`, 0, '', '', '', '']);
      for (const p of v.replicas ?? []) {
        const outstanding = p.sets.filter((s) => s.state !== 'acknowledged' || s.set > p.playedSet).length;
        rows.push([
          v.volume,
          'primary',
          `${p.remoteVolume}@${p.peer}`,
          p.state + syncWord(p) + (p.reason && (p.state === 'failure-suspend' || p.state === 'disconnected') ? ` (${p.reason})` : ''),
          p.generation,
          `${v.currentSet}/${p.ackedSet}/${p.playedSet}`,
          outstanding,
          `${p.lagSeconds.toFixed(1)} s`,
          `${p.rpo.seconds.toFixed(1)} s`,
          formatBytes(p.bytesDifferent),
          p.initialCopy ? `${p.initialCopy.kind === 'full' ? 'copy' : p.initialCopy.kind} ${formatBytes(p.initialCopy.doneBytes)}/${formatBytes(p.initialCopy.totalBytes)}` : `${rate(p.currentBytesPerSec)} (avg ${rate(p.averageBytesPerSec)})`,
        ]);
      }
    } else if (v.role === 'replica') {
      rows.push([
        v.volume,
        'replica',
        v.primaryVolume ?? '',
        (v.state ?? '') + (v.consistent === false ? ' (not consistent)' : ''),
        v.generation ?? 0,
        `-/${v.ackedSet}/${v.playedSet}`,
        v.setsHeld?.length ?? 0,
        `${(v.lagSeconds ?? 0).toFixed(1)} s`,
        `${(v.rpo?.seconds ?? 0).toFixed(1)} s`,
        '',
        v.copy ? `${v.copy.kind} ${formatBytes(v.copy.receivedBytes)}/${formatBytes(v.copy.totalBytes)}` : v.connected ? 'connected' : 'not connected',
      ]);
    } else if (v.state && v.state !== 'simplex') {
      rows.push([v.volume, v.role, '', v.state, v.generation ?? 0, '', '', '', '', '', '']);
    }
  }
  if (rows.length === 0 && notes.length === 0) return 'no replication';
  return [table(['VOLUME', 'ROLE', 'PEER', 'STATE', 'GEN', 'SET cut/acked/played', 'OUTSTANDING', 'LAG', 'RPO', 'DIFFERENT', 'RATE'], rows), ...notes].join('\n');
}

function pairDetail(v: VolumeReplication, p: PairStatus): string {
  const lines = [
    `${v.volume} → ${p.remoteVolume} at ${p.peer}  (pair ${p.id})`,
    `  state ${p.state}${p.reason ? ` — ${p.reason}` : ''}, generation ${p.generation}`,
    `  sets: current ${v.currentSet}, acknowledged ${p.ackedSet}, played ${p.playedSet}`,
    `  lag ${p.lagSeconds.toFixed(1)} s, a failover there now would lose ${p.rpo.seconds.toFixed(1)} s of writes, different from the replica: ${formatBytes(p.bytesDifferent)}`,
    `  rate ${rate(p.currentBytesPerSec)} now, ${rate(p.averageBytesPerSec)} average`,
  ];
  const y = p.sync;
  if (y) {
    lines.push(
      `  mode sync, fence ${y.fence}, timeout ${y.timeoutMs} ms: stream ${y.stream}${y.streamingSeconds !== null ? ` for ${y.streamingSeconds.toFixed(0)} s` : ''}, ${y.unacknowledged} waiting` +
        (y.latency ? `, replica round trip p50 ${y.latency.p50Us} µs p99 ${y.latency.p99Us} µs` : ''),
      `  ${y.writes} writes streamed, ${y.breaks} breaks, ${y.released} released unacknowledged (fence never), ${y.refused + y.failed} refused with EIO (fence data)` + (y.lastBreak ? `; last break ${y.lastBreak.at}: ${y.lastBreak.reason}` : ''),
    );
  }
  if (p.initialCopy) lines.push(`  initial copy ${formatBytes(p.initialCopy.doneBytes)} of ${formatBytes(p.initialCopy.totalBytes)}, ${rate(p.initialCopy.bytesPerSec)}`);
  if (p.sets.length > 0) {
    lines.push(
      table(
        ['  SET', 'CREATED', 'BLOCKS', 'BYTES', 'STATE'],
        p.sets.slice(0, 20).map((s) => [`  ${s.set}`, s.createdAt, s.blocks, formatBytes(s.bytes), s.state + (s.partial ? ' (partial)' : '')]),
      ),
    );
  }
  return lines.join('\n');
}

async function replicationOf(c: ControlClient, volume: string): Promise<VolumeReplication> {
  const r = await c.request<{ volumes: VolumeReplication[] }>('GET', `/v1/replication?volume=${encodeURIComponent(volume)}`);
  return r.volumes[0]!;
}

/** Follows an initial copy until it is done: a bar on a terminal, a line every 5 s otherwise. */
async function followInitialCopy(c: ControlClient, volume: string, pairId: string, timeoutMs: number): Promise<PairStatus> {
  const tty = process.stderr.isTTY;
  const bar = tty
    ? new cliProgress.SingleBar(
        { format: 'initial copy [{bar}] {percentage}% | {done} of {total} | {rate} | ETA {eta_formatted}', hideCursor: true, stream: process.stderr },
        cliProgress.Presets.shades_classic,
      )
    : null;
  let started = false;
  let lastLine = 0;
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      const v = await replicationOf(c, volume);
      const p = v.replicas?.find((x) => x.id === pairId);
      if (!p) throw new DeltavolError('EINVAL_ARGUMENT', `pair ${pairId} disappeared`);
      const ic = p.initialCopy;
      if (ic === null) {
        if (bar && started) bar.update(bar.getTotal(), { done: formatBytes(bar.getTotal()), total: formatBytes(bar.getTotal()), rate: '' });
        return p;
      }
      if (p.state === 'failure-suspend') {
        const code = p.reasonCode ?? 'PEER_UNREACHABLE';
        if (code === 'PEER_UNREACHABLE' || code === 'IO') throw new DeltavolError('PEER_UNREACHABLE', `initial copy stalled: ${p.reason ?? 'peer unreachable'} (it resumes by itself when the peer returns)`);
        const local = code === 'VOLUME_EXISTS' || code === 'GEOMETRY' || code === 'STALE_GENERATION' || code === 'ROLE_CONFLICT' || code === 'VOLUME_NOT_FOUND' ? code : 'PEER_REFUSED';
        throw new DeltavolError(local, `${p.reason} (remove the pair with \`deltavol replica remove ${volume} ${pairId}\`, or fix the peer: the pair keeps retrying)`);
      }
      const payload = { done: formatBytes(ic.doneBytes), total: formatBytes(ic.totalBytes), rate: rate(ic.bytesPerSec) };
      if (bar) {
        if (!started) {
          bar.start(Math.max(1, ic.totalBytes), ic.doneBytes, payload);
          started = true;
        } else bar.update(ic.doneBytes, payload);
      } else if (Date.now() - lastLine >= 5000) {
        lastLine = Date.now();
        const pct = ic.totalBytes > 0 ? Math.floor((100 * ic.doneBytes) / ic.totalBytes) : 0;
        process.stderr.write(`initial copy ${pct}% ${payload.done} of ${payload.total}, ${payload.rate}, ETA ${ic.etaSeconds ?? '?'} s\n`);
      }
      if (Date.now() > deadline) throw new DeltavolError('IO', `initial copy not done after ${timeoutMs / 1000} s (it goes on in the daemon)`);
      await new Promise((r) => setTimeout(r, 250));
    }
  } finally {
    bar?.stop();
  }
}

export function registerReplicationCommands(program: Command, h: Helpers): void {
  const replica = program.command('replica').description('replicate volumes to a peer deltavol: add, list, remove, suspend, resume, cut');

  replica
    .command('add <volume>')
    .description("start replicating VOLUME to a peer daemon: the peer creates the replica, an initial copy follows, then delta sets")
    .requiredOption('--peer <host:port>', "the peer daemon's replication address (its `serve --repl-port`)")
    .option('--as <name>', 'name of the replica volume on the peer (default: the same name)')
    .option('--cut-interval <duration>', 'cut a delta set at least this often while there are changes', '5s')
    .option('--high-water <size>', 'cut a delta set when this many bytes changed', '64M')
    .option('--retries <n>', 'failed connection attempts before the pair goes to failure-suspend', '5')
    .option('--mode <mode>', 'async: writes are acknowledged at once and ship in delta sets; sync: a write is acknowledged only once the replica has it, a flush once it is durable there', 'async')
    .option('--fence <policy>', 'sync pairs, replica unreachable: never (keep serving, the pair falls back to sets and catches up) or data (fail writes with EIO)')
    .option('--sync-timeout <duration>', 'sync pairs: a write the replica has not acknowledged within this long stops waiting (default 2s)')
    .option('--no-wait', 'return at once instead of following the initial copy')
    .option('--timeout <duration>', 'give up following the initial copy after this long', '24h')
    .option('--json', 'print JSON')
    .action(async (volume: string, opts, cmd: Command) => {
      const c = h.client(cmd);
      const pair = await c.request<{ id: string; remoteVolume: string; peerHost: string; peerPort: number }>('POST', `/v1/volumes/${encodeURIComponent(volume)}/replicas`, {
        peer: opts.peer,
        ...(opts.as ? { as: opts.as } : {}),
        cutIntervalMs: parseDurationMs(opts.cutInterval),
        highWaterBytes: parseSizeBytes(opts.highWater),
        retries: Number(opts.retries),
        ...(opts.mode !== 'async' ? { mode: opts.mode } : {}),
        ...(opts.fence !== undefined ? { fence: opts.fence } : {}),
        ...(opts.syncTimeout !== undefined ? { syncTimeoutMs: parseDurationMs(opts.syncTimeout) } : {}),
      });
      if (!opts.json) process.stderr.write(`pair ${pair.id}: ${volume} → ${pair.remoteVolume} at ${pair.peerHost}:${pair.peerPort}\n`);
      const status = opts.wait ? await followInitialCopy(c, volume, pair.id, parseDurationMs(opts.timeout)) : null;
      h.print(opts.json, status ?? pair, () => (status ? `initial copy complete; pair ${pair.id} is ${status.state}` : `pair ${pair.id} added; initial copy running (see \`deltavol status ${volume}\`)`));
    });

  replica
    .command('list <volume>')
    .description("show a volume's replicas: state, sets, lag, rate")
    .option('--json', 'print JSON')
    .action(async (volume: string, opts, cmd: Command) => {
      const v = await replicationOf(h.client(cmd), volume);
      h.print(opts.json, v, () => (v.role === 'primary' ? (v.replicas ?? []).map((p) => pairDetail(v, p)).join('\n\n') : renderReplication([v])));
    });

  replica
    .command('remove <volume> <pair>')
    .description('stop replicating to a replica (PAIR: its id, remote volume name or HOST:PORT); the replica volume stays on the peer')
    .action(async (volume: string, pair: string, _o, cmd: Command) => {
      await h.client(cmd).request('DELETE', `/v1/volumes/${encodeURIComponent(volume)}/replicas/${encodeURIComponent(pair)}`);
      process.stdout.write(`replica ${pair} of ${volume} removed\n`);
    });

  for (const [name, what] of [
    ['suspend', 'split the pair: stop shipping (changes are recorded and the replica becomes writable, recording its own writes)'],
    ['resume', 'resume a split or failed pair: only blocks that differ travel'],
  ] as const) {
    replica
      .command(`${name} <volume>`)
      .description(what)
      .option('--pair <pair>', 'only this pair (default: every pair of the volume)')
      .option('--json', 'print JSON')
      .action(async (volume: string, opts, cmd: Command) => {
        const r = await h.client(cmd).request<{ pairs: { id: string }[] }>('POST', `/v1/volumes/${encodeURIComponent(volume)}/replicas/${name}`, opts.pair ? { pair: opts.pair } : {});
        h.print(opts.json, r, () => r.pairs.map((p) => `pair ${p.id}: ${name === 'suspend' ? 'suspended' : 'resumed'}`).join('\n'));
      });
  }

  replica
    .command('cut <volume>')
    .description('cut a delta set now; with --snapshot, also take a snapshot stamped with its number')
    .option('--snapshot <name>', 'snapshot taken at the cut (equals the replica once it has played this set)')
    .option('--json', 'print JSON')
    .action(async (volume: string, opts, cmd: Command) => {
      const r = await h.client(cmd).request<{ set: number | null }>('POST', `/v1/volumes/${encodeURIComponent(volume)}/cut`, opts.snapshot ? { snapshot: opts.snapshot } : {});
      h.print(opts.json, r, () => (r.set === null ? 'nothing to cut (no changes, or the outbound save area is full)' : `delta set ${r.set} cut${opts.snapshot ? `, snapshot ${opts.snapshot} stamped ${r.set}` : ''}`));
    });
}

export { replicationOf };
