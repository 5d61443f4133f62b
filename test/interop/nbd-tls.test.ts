// Why: NBD TLS is only worth something if clients nobody here wrote can use it (libnbd's
// nbdinfo/nbdcopy/nbdsh, qemu-img) and if it refuses what it must: a wrong PSK, a client
// certificate outside --tls-authz or from another CA, and in `require` mode every option
// before STARTTLS. Credentials are made with certtool/psktool in a temp dir. Without
// those tools (or a client), the tests that need them are skipped, with the reason in
// their names.

import fs from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { spawnSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, have, run, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { makeSparseImage, sha256File, tempDir } from '../helpers/images.js';
import { NBDSH_ENV } from '../helpers/nbdsh.js';
import { OPT, REP, RawNbd } from '../helpers/raw-nbd.js';
import { makeTlsCreds, type TlsCreds } from '../helpers/tls-creds.js';

const MiB = 1024 * 1024;
const haveCredTools = have('certtool') && have('psktool');
const haveLibnbd = haveCredTools && have('nbdinfo') && have('nbdcopy');
const haveNbdsh = haveCredTools && have('nbdsh');
const haveQemu = haveCredTools && have('qemu-img');
const needs = (what: string) => ` (skipped: needs ${what})`;
const libnbdNote = haveLibnbd ? '' : needs('certtool, psktool, nbdinfo, nbdcopy');
const qemuNote = haveQemu ? '' : needs('certtool, psktool, qemu-img');

let dir: string;
let creds: TlsCreds;
/** --tls require with a PSK file. */
let psk: TestDaemon;
/** --tls require with X.509, client certificates verified, only CN alice allowed. */
let x509: TestDaemon;
/** --tls on with X.509 (plain clients still served). */
let optional: TestDaemon;

beforeAll(async () => {
  if (!haveCredTools) return;
  dir = tempDir('nbd-tls');
  creds = makeTlsCreds(dir, [
    { name: 'alice', cn: 'alice' },
    { name: 'mallory', cn: 'mallory' },
    { name: 'rogue-alice', cn: 'alice', rogue: true },
  ]);
  const s = creds.serverDir;
  [psk, x509, optional] = await Promise.all([
    startDaemon({ volumes: [{ name: 'vol', size: '16M' }, { name: 'copy', size: '8M' }], extraArgs: ['--tls', 'require', '--tls-psk', creds.pskFile] }),
    startDaemon({
      volumes: [{ name: 'vol', size: '16M' }, { name: 'conv', size: '8M' }],
      extraArgs: ['--tls', 'require', '--tls-cert', `${s}/server-cert.pem`, '--tls-key', `${s}/server-key.pem`, '--tls-ca', `${s}/ca-cert.pem`, '--tls-verify-peer', '--tls-authz', 'alice'],
    }),
    startDaemon({ volumes: [{ name: 'vol', size: '4M' }], extraArgs: ['--tls', 'on', '--tls-cert', `${s}/server-cert.pem`, '--tls-key', `${s}/server-key.pem`] }),
  ]);
});

afterAll(async () => {
  await Promise.all([psk?.dispose(), x509?.dispose(), optional?.dispose()]);
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

const pskUri = (d: TestDaemon, exp: string, file = creds.pskFile) => `nbds://alice@127.0.0.1:${d.nbdPort}/${exp}?tls-psk-file=${file}`;
const certUri = (d: TestDaemon, exp: string, who: string) => `nbds://127.0.0.1:${d.nbdPort}/${exp}?tls-certificates=${creds.clientDirs[who]}`;
const nbdinfo = (uri: string) => run('nbdinfo', [uri], { allowFail: true, timeoutMs: 30_000 });

/** Waits (bounded) until the daemon log contains `text`. */
async function logSays(d: TestDaemon, text: string, timeoutMs = 5000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (d.log().includes(text)) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}

const tlsLines = (d: TestDaemon) => d.log().split('\n').filter((l) => l.includes('TLS')).join('\n');

/** Plain handshake up to the STARTTLS ACK, then Node's TLS client on the same socket. */
async function starttls(d: TestDaemon, extra: tls.ConnectionOptions = {}): Promise<{ plain: RawNbd; secure: RawNbd }> {
  const plain = await RawNbd.connect({ port: d.nbdPort });
  await plain.greeting();
  plain.write(RawNbd.clientFlags());
  plain.write(RawNbd.option(OPT.STARTTLS));
  const ack = await plain.optionReply();
  expect([ack.option, ack.type, ack.data.length]).toEqual([OPT.STARTTLS, REP.ACK, 0]);
  const socket = tls.connect({ socket: plain.socket, ca: fs.readFileSync(path.join(creds.serverDir, 'ca-cert.pem')), servername: 'localhost', ...extra });
  await new Promise<void>((resolve, reject) => {
    socket.once('secureConnect', resolve);
    socket.once('error', reject);
  });
  return { plain, secure: RawNbd.over(socket) };
}

describe('NBD TLS with PSK (--tls require --tls-psk)', () => {
  it.skipIf(!haveLibnbd)(`nbdinfo connects with the right key and negotiates TLS${libnbdNote}`, () => {
    const r = nbdinfo(pskUri(psk, 'vol'));
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/with TLS/);
    expect(r.stdout).toMatch(/export-size: 16777216/);
  });

  it.skipIf(!haveLibnbd)(`a wrong key for the same identity is refused${libnbdNote}`, async () => {
    const r = nbdinfo(pskUri(psk, 'vol', creds.wrongPskFile));
    expect(r.status).not.toBe(0);
    expect(r.stdout).not.toMatch(/export-size/);
    expect(await logSays(psk, 'TLS refused')).toBe(true);
  });

  it.skipIf(!haveLibnbd)(`a plain client is refused in require mode${libnbdNote}`, () => {
    const r = nbdinfo(`nbd://127.0.0.1:${psk.nbdPort}/vol`);
    expect(r.status).not.toBe(0);
    expect(r.stdout).not.toMatch(/export-size/);
  });

  it.skipIf(!haveLibnbd)(`nbdcopy writes an image through TLS and reads it back unchanged${libnbdNote}`, () => {
    const src = path.join(dir, 'psk-src.img');
    const back = path.join(dir, 'psk-back.img');
    makeSparseImage(src, 8 * MiB, { regions: 8, maxRegionBytes: 512 * 1024, seed: 11 });
    run('nbdcopy', [src, pskUri(psk, 'copy')], { timeoutMs: 60_000 });
    run('nbdcopy', [pskUri(psk, 'copy'), back], { timeoutMs: 60_000 });
    expect(sha256File(back)).toBe(sha256File(src));
  });

  it.skipIf(!haveNbdsh)(`nbdsh sees TLS negotiated and reads what nbdcopy wrote${haveNbdsh ? '' : needs('nbdsh')}`, () => {
    // tls-psk-file in a URI is a local file: libnbd wants that allowed before connecting.
    const script = `h.set_uri_allow_local_file(True)\nh.connect_uri(os.environ['URI'])\nprint(h.get_tls_negotiated(), h.get_size())`;
    const r = spawnSync('nbdsh', ['-c', 'import os', '-c', script], { encoding: 'utf8', timeout: 30_000, env: { ...NBDSH_ENV, URI: pskUri(psk, 'vol') } });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(`True ${16 * MiB}`);
  });

  it.skipIf(!haveCredTools)('a raw client is refused LIST, INFO, GO and unknown options before STARTTLS, and EXPORT_NAME closes', async () => {
    const c = await RawNbd.connect({ port: psk.nbdPort });
    try {
      await c.greeting();
      c.write(RawNbd.clientFlags());
      for (const [opt, data] of [
        [OPT.LIST, Buffer.alloc(0)],
        [OPT.INFO, RawNbd.goData('vol')],
        [OPT.GO, RawNbd.goData('vol')],
        [OPT.STRUCTURED_REPLY, Buffer.alloc(0)],
        [42, Buffer.from('?')],
      ] as const) {
        c.write(RawNbd.option(opt, data));
        const r = await c.optionReply();
        expect([r.option, r.type]).toEqual([opt, REP.ERR_TLS_REQD]);
        expect(r.data.includes(Buffer.from('vol'))).toBe(false);
      }
      c.write(RawNbd.option(OPT.EXPORT_NAME, Buffer.from('vol')));
      expect(await c.closedWithin(5000)).toBe(true);
      expect(c.buffered).toBe(0);
    } finally {
      c.destroy();
    }
  });

  it.skipIf(!haveQemu)(`qemu-img info with tls-creds-psk${qemuNote}`, () => {
    const r = run(
      'qemu-img',
      ['info', '--output=json', '--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${creds.pskDir},username=alice`, '--image-opts', `driver=nbd,host=127.0.0.1,port=${psk.nbdPort},export=vol,tls-creds=tls0`],
      { allowFail: true, timeoutMs: 30_000 },
    );
    expect(r.status, r.stderr).toBe(0);
    expect((JSON.parse(r.stdout) as Record<string, unknown>)['virtual-size']).toBe(16 * MiB);
  });

  it.skipIf(!haveCredTools)('status and daemon.json show the TLS mode and credentials', () => {
    const j = JSON.parse(psk.cli(['status', '--json']).stdout) as { daemon: { nbdTls: { mode: string; credentials: string } } };
    expect(j.daemon.nbdTls).toMatchObject({ mode: 'require', credentials: 'psk' });
    expect(psk.cli(['status']).stdout).toMatch(/NBD TLS: require \(PSK\)/);
    const info = JSON.parse(fs.readFileSync(path.join(x509.dataDir, 'daemon.json'), 'utf8')) as { nbdTls: unknown };
    expect(info.nbdTls).toEqual({ mode: 'require', credentials: 'x509', verifyPeer: true, authz: ['alice'] });
  });
});

describe('NBD TLS with X.509 (--tls require --tls-verify-peer --tls-authz alice)', () => {
  it.skipIf(!haveLibnbd)(`nbdinfo with tls-certificates of an allowed client${libnbdNote}`, () => {
    const r = nbdinfo(certUri(x509, 'vol', 'alice'));
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/with TLS/);
  });

  it.skipIf(!haveLibnbd)(`a client certificate not in --tls-authz is refused${libnbdNote}`, async () => {
    const r = nbdinfo(certUri(x509, 'vol', 'mallory'));
    expect(r.status).not.toBe(0);
    expect(r.stdout).not.toMatch(/export-size/);
    expect(await logSays(x509, 'is not in --tls-authz')).toBe(true);
  });

  it.skipIf(!haveLibnbd)(`a certificate with an allowed name from another CA is refused${libnbdNote}`, async () => {
    const r = nbdinfo(certUri(x509, 'vol', 'rogue-alice'));
    expect(r.status).not.toBe(0);
    expect(r.stdout).not.toMatch(/export-size/);
    // GnuTLS offers only a certificate from a CA the server names, so it sends none.
    expect(await logSays(x509, 'the client sent no certificate'), tlsLines(x509)).toBe(true);
  });

  it.skipIf(!haveCredTools)('a client certificate from another CA, sent anyway, fails verification before any option is answered', async () => {
    const rogue = creds.clientDirs['rogue-alice']!;
    const { plain, secure } = await starttls(x509, { cert: fs.readFileSync(`${rogue}/client-cert.pem`), key: fs.readFileSync(`${rogue}/client-key.pem`) });
    try {
      secure.write(RawNbd.option(OPT.LIST));
      expect(await secure.closedWithin(5000)).toBe(true);
      expect(secure.buffered).toBe(0);
      expect(await logSays(x509, 'client certificate \\"CN=alice,O=deltavol test,C=GB\\" refused: UNABLE_TO_VERIFY_LEAF_SIGNATURE'), tlsLines(x509)).toBe(true);
    } finally {
      secure.destroy();
      plain.destroy();
    }
  });

  it.skipIf(!haveCredTools)('the allowed client over a raw TLS socket gets the export', async () => {
    const alice = creds.clientDirs.alice!;
    const { plain, secure } = await starttls(x509, { cert: fs.readFileSync(`${alice}/client-cert.pem`), key: fs.readFileSync(`${alice}/client-key.pem`) });
    try {
      secure.write(RawNbd.option(OPT.GO, RawNbd.goData('vol')));
      expect((await secure.goReplies()).size).toBe(BigInt(16 * MiB));
      // status names the connection's TLS client
      const st = await x509.api<{ connections: { export: string | null; tls: boolean; tlsClient: string | null }[] }>('GET', '/v1/status');
      expect(st.connections).toContainEqual(expect.objectContaining({ export: 'vol', tls: true, tlsClient: 'CN=alice,O=deltavol test,C=GB' }));
    } finally {
      secure.destroy();
      plain.destroy();
    }
  });

  const qemuX509 = (who: string) => `tls-creds-x509,id=tls0,endpoint=client,dir=${creds.clientDirs[who]}`;
  const qemuOpts = (exp: string) => `driver=nbd,host=127.0.0.1,port=${x509.nbdPort},export=${exp},tls-creds=tls0`;

  it.skipIf(!haveQemu)(`qemu-img info and convert through tls-creds-x509${qemuNote}`, () => {
    const info = run('qemu-img', ['info', '--output=json', '--object', qemuX509('alice'), '--image-opts', qemuOpts('vol')], { timeoutMs: 30_000 });
    expect((JSON.parse(info.stdout) as Record<string, unknown>)['virtual-size']).toBe(16 * MiB);
    const src = path.join(dir, 'x509-src.img');
    const back = path.join(dir, 'x509-back.img');
    makeSparseImage(src, 8 * MiB, { regions: 8, maxRegionBytes: 512 * 1024, seed: 23 });
    run('qemu-img', ['convert', '-n', '--object', qemuX509('alice'), '-f', 'raw', src, '--target-image-opts', qemuOpts('conv')], { timeoutMs: 60_000 });
    run('qemu-img', ['convert', '--object', qemuX509('alice'), '--image-opts', qemuOpts('conv'), '-O', 'raw', back], { timeoutMs: 60_000 });
    expect(sha256File(back)).toBe(sha256File(src));
  });

  it.skipIf(!haveQemu)(`qemu-img with a certificate outside --tls-authz is refused${qemuNote}`, () => {
    const r = run('qemu-img', ['info', '--object', qemuX509('mallory'), '--image-opts', qemuOpts('vol')], { allowFail: true, timeoutMs: 30_000 });
    expect(r.status).not.toBe(0);
  });
});

describe('NBD TLS optional (--tls on)', () => {
  it.skipIf(!haveLibnbd)(`plain and TLS clients are both served${libnbdNote}`, () => {
    const plain = nbdinfo(`nbd://127.0.0.1:${optional.nbdPort}/vol`);
    expect(plain.status, plain.stderr).toBe(0);
    expect(plain.stdout).toMatch(/without TLS/);
    const secure = nbdinfo(certUri(optional, 'vol', 'alice'));
    expect(secure.status, secure.stderr).toBe(0);
    expect(secure.stdout).toMatch(/with TLS/);
  });

  it.skipIf(!haveCredTools)('after STARTTLS over a raw TLS socket: a second STARTTLS is ERR_INVALID, then GO and READ work', async () => {
    const { plain, secure } = await starttls(optional);
    try {
      secure.write(RawNbd.option(OPT.STARTTLS));
      const again = await secure.optionReply();
      expect([again.option, again.type]).toEqual([OPT.STARTTLS, REP.ERR_INVALID]);
      secure.write(RawNbd.option(OPT.GO, RawNbd.goData('vol')));
      const { size } = await secure.goReplies();
      expect(size).toBe(BigInt(4 * MiB));
      expect((await secure.readSimple(0, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    } finally {
      secure.destroy();
      plain.destroy();
    }
  });

  it.skipIf(!haveCredTools)('plaintext pipelined behind STARTTLS closes the connection (no injection)', async () => {
    const c = await RawNbd.connect({ port: optional.nbdPort });
    try {
      await c.greeting();
      c.write(Buffer.concat([RawNbd.clientFlags(), RawNbd.option(OPT.STARTTLS), RawNbd.option(OPT.GO, RawNbd.goData('vol'))]));
      const ack = await c.optionReply();
      expect(ack.type).toBe(REP.ACK);
      expect(await c.closedWithin(5000)).toBe(true);
      expect(c.buffered).toBe(0); // no GO reply, in the clear or otherwise
    } finally {
      c.destroy();
    }
  });
});

describe('NBD TLS settings that cannot work stop `serve` with a clear error', () => {
  const serve = (args: string[]) => {
    const data = tempDir('nbd-tls-bad');
    try {
      return spawnSync(process.execPath, [CLI, 'serve', '--data-dir', data, '--port', '0', '--control-port', '0', '--repl-port', '0', ...args], { encoding: 'utf8', timeout: 20_000 });
    } finally {
      fs.rmSync(data, { recursive: true, force: true });
    }
  };

  it.skipIf(!haveCredTools)('require without credentials, authz without a CA, both PSK and X.509, a flag with --tls off', () => {
    const s = creds.serverDir;
    const cases: [string[], RegExp][] = [
      [['--tls', 'require'], /needs credentials/],
      [['--tls', 'on', '--tls-cert', `${s}/server-cert.pem`, '--tls-key', `${s}/server-key.pem`, '--tls-authz', 'alice'], /--tls-authz needs --tls-ca/],
      [['--tls', 'on', '--tls-cert', `${s}/server-cert.pem`, '--tls-key', `${s}/server-key.pem`, '--tls-psk', creds.pskFile], /not both/],
      [['--tls-psk', creds.pskFile], /--tls is off/],
      [['--tls', 'on', '--tls-cert', `${s}/server-cert.pem`], /needs --tls-key/],
      [['--tls', 'on', '--tls-cert', `${s}/server-cert.pem`, '--tls-key', `${creds.clientDirs.alice}/client-key.pem`], /--tls-cert .* --tls-key .*mismatch/i],
      [['--tls', 'on', '--tls-psk', path.join(dir, 'missing.psk')], /cannot read --tls-psk .*missing\.psk/],
    ];
    for (const [args, message] of cases) {
      const r = serve(args);
      expect(r.status, args.join(' ')).not.toBe(0);
      expect(r.stderr, args.join(' ')).toMatch(message);
    }
  });

  it.skipIf(!haveCredTools)('a malformed PSK file names the line', () => {
    const bad = path.join(dir, 'bad.psk');
    fs.writeFileSync(bad, `alice:${'ab'.repeat(32)}\nbob-without-a-key\n`, { mode: 0o600 });
    const r = serve(['--tls', 'require', '--tls-psk', bad]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/bad\.psk line 2: expected IDENTITY:HEXKEY/);
  });
});
