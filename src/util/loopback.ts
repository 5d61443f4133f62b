// Why: three listeners (NBD, control API, replication) decide what to warn about or refuse
// by whether their address only accepts local connections; one definition keeps them agreeing.

/** Whether a listen address (or Host name) only reaches this machine: localhost, 127/8, ::1, ::ffff:127/8, brackets allowed. */
export function isLoopbackHost(host: string): boolean {
  const h = host.trim().toLowerCase().replace(/^\[|\]$/g, '');
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h) || /^::ffff:127\.\d+\.\d+\.\d+$/.test(h);
}
