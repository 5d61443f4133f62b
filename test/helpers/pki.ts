// Why: replication over X.509 is tested with real certificates: a CA, node certificates
// it signed (the CN is the node's replication identity), and a look-alike signed by another
// CA. Made with openssl in a temp directory the caller removes.

import { spawnSync } from 'node:child_process';

/** A CA, a certificate per name signed by it, and "mallory": CN alpha signed by another CA. */
export function makePki(dir: string, names: string[]): void {
  const sh = (args: string[]) => {
    const r = spawnSync('openssl', args, { cwd: dir, encoding: 'utf8', timeout: 30_000 });
    if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr}`);
  };
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  sh(['req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=deltavol-test-ca']);
  sh(['req', '-x509', ...ec, '-keyout', 'rogue-ca.key', '-out', 'rogue-ca.pem', '-days', '2', '-subj', '/CN=rogue-ca']);
  const leaf = (name: string, cn: string, ca: string) => {
    sh(['req', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`]);
    sh(['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.pem`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-out', `${name}.pem`, '-days', '2']);
  };
  for (const n of names) leaf(n, n, 'ca');
  leaf('mallory', 'alpha', 'rogue-ca');
}
