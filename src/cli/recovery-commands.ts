// Why: the disaster-recovery words of the CLI — failover, resync, failback, unfence —
// kept apart from main.ts and replication-commands.ts so each file stays one concern.
// Like them it only turns words into control-API requests and answers into text: the
// data-loss report after a failover, a progress bar while a resync copies.

import type { Command } from 'commander';
import cliProgress from 'cli-progress';
import { DeltavolError } from '../util/errors.js';
import { formatBytes, parseDurationMs, parseHostPort } from '../util/units.js';
import type { ControlClient } from './control-client.js';
import { escapeText } from './format.js';
import type { FailoverResult } from '../recovery/failover.js';
import type { TakeoverResult } from '../recovery/handover.js';
import type { ResyncResult } from '../recovery/resync.js';
import type { RestorePlan, RestoreProgress } from '../recovery/restore.js';

type Helpers = {
  client: (cmd: Command) => ControlClient;
  print: (json: boolean, value: unknown, human: () => string) => void;
};

type FailoverAnswer = Partial<FailoverResult> & Partial<TakeoverResult> & { volume: string; generation: number; previousGeneration: number; rtoMs: number };
type ResyncAnswer = ResyncResult;

interface ReplicaView {
  role: string;
  state: string;
  initialCopy?: { done: boolean; offsetBytes: number };
  copy?: { kind: string; totalBytes: number; receivedBytes: number } | null;
  resync?: { registered: boolean; full: boolean } | null;
  bytesReceived?: number;
}

const time = (ms: number | null) => (ms === null ? 'unknown' : new Date(ms).toISOString());

function sets(list: number[]): string {
  if (list.length === 0) return 'none';
  return list.length <= 6 ? list.join(', ') : `${list[0]}–${list[list.length - 1]} (${list.length} sets)`;
}

/** The data-loss report of an unplanned failover (seed 002): what may be missing, and since when. */
export function renderFailover(a: FailoverAnswer): string {
  const lines = [`${a.volume} is now the primary (generation ${a.generation}, was ${a.previousGeneration}); writable after ${(a.rtoMs / 1000).toFixed(2)} s`];
  if (a.how) {
    lines.push(`${a.how}: every write of the old primary is here (sets up to ${a.lastSet} played); nothing lost`);
    return lines.join('\n');
  }
  const r = a.report!;
  if (a.restartPoint) lines.push(`restart point: ${a.restartPoint.snapshot ? `snapshot ${a.volume}@${a.restartPoint.snapshot}` : 'none'} = the old primary as of its set ${a.restartPoint.set}`);
  if (a.setsPlayed && a.setsPlayed.length > 0) lines.push(`played before taking over: sets ${sets(a.setsPlayed)}`);
  if (r.atRiskSinceMs === null && r.setsNotHere.length === 0 && r.setsDropped.length === 0) {
    lines.push(
      r.lastContactMs === null
        ? 'data loss: unknown (the old primary never reported to this node)'
        : `data loss: none known: at its last contact (${time(r.lastContactMs)}) the old primary had nothing this node lacked; writes it took after that, if any, are missing`,
    );
  } else {
    lines.push(
      `DATA LOSS: writes the old primary made after ${time(r.atRiskSinceMs)} may be missing here: ${r.seconds.toFixed(1)} s of writes up to its last contact (${time(r.lastContactMs)}), at most ${formatBytes(r.bytesAtMost)}`,
    );
    if (r.setsNotHere.length > 0) lines.push(`  sets the old primary had cut that never completed here: ${sets(r.setsNotHere)}`);
    if (r.setsDropped.length > 0) lines.push(`  sets received but not played (--now): ${sets(r.setsDropped)}`);
    if (r.lastContactMs !== null) lines.push(`  if the old primary went on taking writes after its last contact (${time(r.lastContactMs)}), those are missing too`);
    lines.push('  those writes are not destroyed: `deltavol resync` on the old primary keeps them in a snapshot there');
  }
  if (!r.consistent) lines.push('WARNING: the volume is between two points in time of the old primary (a partial set): check the file system');
  for (const d of a.downstream ?? []) {
    lines.push(`its replica ${d.volume}@${d.peer} (cascade) lacks ${formatBytes(d.bytesDifferent)} of it (played set ${d.playedSet} of ${d.lastSet}, lag ${d.lagSeconds.toFixed(1)} s${d.connected ? '' : ', not connected'}): it follows this primary and catches up by itself`);
  }
  for (const w of a.warnings ?? []) lines.push(`warning: ${w}`);
  return lines.join('\n');
}

async function followResync(c: ControlClient, volume: string, timeoutMs: number): Promise<ReplicaView> {
  const tty = process.stderr.isTTY;
  const bar = tty ? new cliProgress.SingleBar({ format: 'resync [{bar}] {percentage}% | {done} of {total} | {what}', hideCursor: true, stream: process.stderr }, cliProgress.Presets.shades_classic) : null;
  let started = false;
  let lastLine = 0;
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      const r = await c.request<{ volumes: ReplicaView[] }>('GET', `/v1/replication?volume=${encodeURIComponent(volume)}`);
      const v = r.volumes[0]!;
      if (v.role !== 'replica') throw new DeltavolError('ROLE_CONFLICT', `${volume} is no longer a replica (role ${v.role})`);
      if (!v.resync && v.initialCopy?.done) {
        if (bar && started) bar.update(bar.getTotal());
        return v;
      }
      const copy = v.copy;
      const what = !v.resync?.registered ? 'waiting for the new primary to record the pair' : copy ? `${copy.kind} copy` : `waiting for the new primary (${v.state})`;
      const done = copy?.receivedBytes ?? 0;
      const total = Math.max(1, copy?.totalBytes ?? 1);
      if (bar) {
        if (!started) {
          bar.start(total, done, { done: formatBytes(done), total: formatBytes(total), what });
          started = true;
        } else {
          bar.setTotal(total);
          bar.update(done, { done: formatBytes(done), total: formatBytes(total), what });
        }
      } else if (Date.now() - lastLine >= 5000) {
        lastLine = Date.now();
        process.stderr.write(`resync: ${what}, ${formatBytes(done)} of ${formatBytes(copy?.totalBytes ?? 0)}\n`);
      }
      if (Date.now() > deadline) throw new DeltavolError('IO', `resync not done after ${timeoutMs / 1000} s (it goes on in the daemon; see \`deltavol status ${volume}\`)`);
      await new Promise((r2) => setTimeout(r2, 250));
    }
  } finally {
    bar?.stop();
  }
}

/** Follows a restore from the replica until it ends; its last progress (state done or failed). */
async function followRestore(c: ControlClient, volume: string, plan: RestorePlan, timeoutMs: number): Promise<RestoreProgress> {
  const tty = process.stderr.isTTY;
  const bs = plan.blockBytes;
  const total = Math.max(1, plan.blocksToCopy * bs);
  const bar = tty ? new cliProgress.SingleBar({ format: 'restore [{bar}] {percentage}% | {done} of {total} | {rate}', hideCursor: true, stream: process.stderr }, cliProgress.Presets.shades_classic) : null;
  bar?.start(total, 0, { done: formatBytes(0), total: formatBytes(total), rate: '' });
  let lastLine = 0;
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      const r = await c.request<{ volumes: { restore: RestoreProgress | null }[] }>('GET', `/v1/replication?volume=${encodeURIComponent(volume)}`);
      const p = r.volumes[0]?.restore;
      if (!p || p.state === 'interrupted' as string) throw new DeltavolError('IO', `the restore of ${volume} is no longer running (the daemon restarted?): run the same command again to finish it`);
      const done = p.blocksDone * bs;
      const rate = p.seconds > 0 ? `${formatBytes((p.bytesFetched + p.bytesZeroed) / p.seconds)}/s` : '';
      if (bar) bar.update(Math.min(done, total), { done: formatBytes(done), total: formatBytes(total), rate });
      else if (Date.now() - lastLine >= 5000) {
        lastLine = Date.now();
        process.stderr.write(`restore: ${p.blocksDone} of ${p.blocksToCopy} blocks\n`);
      }
      if (p.state !== 'copying') return p;
      if (Date.now() > deadline) throw new DeltavolError('IO', `restore not done after ${timeoutMs / 1000} s (it goes on in the daemon; see \`deltavol status ${volume}\`)`);
      await new Promise((r2) => setTimeout(r2, 200));
    }
  } finally {
    bar?.stop();
  }
}

export function registerRecoveryCommands(program: Command, h: Helpers): void {
  program
    .command('restore <volume>')
    .description("on the primary: roll the volume back to its replica's current state, or to one of the replica's snapshots (--snapshot), moving only the blocks that differ; the volume's state before is kept in a local snapshot, and client writes are refused until the restore ends")
    .requiredOption('--from-replica', 'restore from the replica (the only source: a local snapshot is `deltavol snapshot restore`)')
    .option('--snapshot <name>', "the replica's snapshot to restore (default: the replica's current state)")
    .option('--peer <host:port>', 'the replica to restore from, when the volume has several')
    .option('--force', 'restore although clients are connected (they see the blocks change under them, and their writes fail until it ends)')
    .option('--abandon', 'end an interrupted restore without finishing it (the volume is left part restored and takes writes again)')
    .option('--no-wait', 'return once the copy has started')
    .option('--timeout <duration>', 'give up following the copy after this long', '24h')
    .option('--json', 'print JSON')
    .action(async (volume: string, opts, cmd: Command) => {
      const c = h.client(cmd);
      if (opts.peer) parseHostPort(opts.peer);
      const timeoutMs = parseDurationMs(opts.timeout);
      if (opts.abandon) {
        const a = await c.request<{ abandoned: { volume: string; beforeSnapshot: string } }>('POST', `/v1/volumes/${encodeURIComponent(volume)}/restore`, { abandon: true });
        h.print(opts.json, a, () => `restore of ${volume} abandoned: it takes writes again, only part restored; its state before the restore is ${volume}@${escapeText(a.abandoned.beforeSnapshot)}`);
        return;
      }
      const plan = await c.request<RestorePlan>('POST', `/v1/volumes/${encodeURIComponent(volume)}/restore`, {
        ...(opts.snapshot !== undefined ? { snapshot: opts.snapshot } : {}),
        ...(opts.peer ? { peer: opts.peer } : {}),
        force: Boolean(opts.force),
      });
      if (!opts.json) {
        const what = plan.temporary ? `the replica's current state (its set ${plan.replicaSet})` : `snapshot ${escapeText(plan.snapshot)} of the replica (its set ${plan.replicaSet})`;
        process.stderr.write(`${plan.resumed ? 'finishing the restore' : 'restoring'} ${volume} from ${what} at ${escapeText(plan.peer)}; its state before is kept in ${volume}@${escapeText(plan.beforeSnapshot)}\n`);
        process.stderr.write(`${plan.blocksToCopy} of ${plan.blocksTotal} blocks differ (${plan.blocksChangedOnReplica} changed on the replica since, ${plan.blocksChangedHere} changed here): ${formatBytes(plan.blocksToCopy * plan.blockBytes)} at most travel\n`);
      }
      const done = opts.wait ? await followRestore(c, volume, plan, timeoutMs) : null;
      if (done && done.state === 'failed') throw new DeltavolError('IO', `restore failed after ${done.blocksDone} of ${done.blocksToCopy} blocks: ${done.error ?? 'unknown error'}; writes stay refused: run the same command again to finish it`);
      h.print(opts.json, done ?? plan, () =>
        done
          ? `${volume} restored in ${done.seconds.toFixed(2)} s: ${done.blocksDone} blocks, ${formatBytes(done.bytesFetched)} fetched, ${formatBytes(done.bytesZeroed)} zeroed; it takes writes again`
          : `restore started (see \`deltavol status ${volume}\`)`,
      );
    });


  program
    .command('failover <volume>')
    .description("on the replica's node: make the replica the primary. Without --sync the primary is gone: every complete set received is played, a restart-point snapshot is taken, and what may be lost is reported")
    .option('--now', 'do not play the sets received but not yet played (fastest; they count as lost)')
    .option('--sync', 'the primary is reachable: it holds writes and ships everything first, nothing is lost (a planned takeover)')
    .option('--force', 'take over although the primary is still connected, the pair is split, or the initial copy is not done')
    .option('--json', 'print JSON')
    .action(async (volume: string, opts, cmd: Command) => {
      if (opts.sync && opts.now) throw new DeltavolError('EINVAL_ARGUMENT', '--sync and --now contradict each other');
      const a = await h.client(cmd).request<FailoverAnswer>('POST', `/v1/volumes/${encodeURIComponent(volume)}/failover`, { now: Boolean(opts.now), sync: Boolean(opts.sync), force: Boolean(opts.force) });
      h.print(opts.json, a, () => renderFailover(a));
    });

  program
    .command('failback <volume>')
    .description("on the replica's node (the original primary after a resync): take the primary role back in a planned swap; nothing is lost and replication goes on the other way without a copy")
    .option('--json', 'print JSON')
    .action(async (volume: string, opts, cmd: Command) => {
      const a = await h.client(cmd).request<FailoverAnswer>('POST', `/v1/volumes/${encodeURIComponent(volume)}/failback`);
      h.print(opts.json, a, () => renderFailover(a));
    });

  program
    .command('resync <volume>')
    .description('on the old primary after a failover: become the new primary\'s replica, copying only the blocks that differ (a full copy only when this volume\'s history is gone); its own divergent writes are kept in a snapshot first. On the last replica of a cascade whose middle is lost: with --peer, become the replica of the middle\'s primary, moving only what it changed since')
    .option('--peer <host:port>', "the new primary's replication address (default: this volume's pair; required to move a replica to another primary)")
    .option('--peer-volume <name>', "the volume's name on the new primary (default: the pair's remote volume)")
    .option('--no-wait', 'return once the new primary recorded the resync, without following the copy')
    .option('--timeout <duration>', 'give up following the copy after this long', '24h')
    .option('--json', 'print JSON')
    .action(async (volume: string, opts, cmd: Command) => {
      const c = h.client(cmd);
      if (opts.peer) parseHostPort(opts.peer); // bad usage before anything happens
      const a = await c.request<ResyncAnswer>('POST', `/v1/volumes/${encodeURIComponent(volume)}/resync`, { ...(opts.peer ? { peer: opts.peer } : {}), ...(opts.peerVolume ? { peerVolume: opts.peerVolume } : {}) });
      if (!opts.json) {
        process.stderr.write(`${volume} is now the replica of ${escapeText(a.peer)} (generation ${a.generation}); its own version is kept in ${volume}@${escapeText(String(a.beforeSnapshot))}\n`);
        if (a.full) process.stderr.write(`WARNING: a full copy is needed: ${escapeText(a.reason)}\n`);
        else process.stderr.write(`only what differs travels: ${a.divergentBlocks} block(s) changed here since the restart point (set ${a.restartSet}), plus what the new primary changed\n`);
        if (!a.registered) process.stderr.write('the new primary has not recorded the resync yet: the daemon keeps trying\n');
      }
      const done = opts.wait ? await followResync(c, volume, parseDurationMs(opts.timeout)) : null;
      h.print(opts.json, done ? { ...a, done: true } : a, () => (done ? `resync complete: ${volume} is a replica in state ${done.state}` : `resync started (see \`deltavol status ${volume}\`)`));
    });

  program
    .command('unfence <volume>')
    .description('let a fenced old primary take writes again although a newer primary exists (two primaries: their data diverges), or call off a stuck planned handover')
    .option('--force', 'also call off a handover already offered to the replica (when the replica is gone for good)')
    .option('--json', 'print JSON')
    .action(async (volume: string, opts, cmd: Command) => {
      const a = await h.client(cmd).request<{ volume: string; was: string }>('POST', `/v1/volumes/${encodeURIComponent(volume)}/unfence`, { force: Boolean(opts.force) });
      h.print(opts.json, a, () => (a.was === 'fenced' ? `${volume} takes writes again (it was fenced: a newer primary exists; resync later to rejoin it)` : `${volume}: planned handover called off, writes resume`));
    });
}
