// Why: Node exits with status 0 when its event loop runs dry, even while a promise is still
// pending. A CLI command whose request lost its connection without an error (seen when the
// daemon was killed mid-request: the kill9 test got status 0, no output, and no snapshot
// created) then looked like a success to a script. This makes such an exit a failure.

/**
 * Runs a command's promise to its end: a non-zero result exits with it; a promise that never
 * settles before the loop runs dry exits with `failedCode` and says so on stderr. An explicit
 * process.exit (a daemon's shutdown) is not affected.
 */
export function exitWhenSettled(command: Promise<number>, okCode: number, failedCode: number): void {
  let settled = false;
  process.once('beforeExit', () => {
    if (settled) return;
    process.stderr.write('deltavol: the command ended without an answer (the connection to the daemon was lost?); it may or may not have taken effect\n');
    process.exitCode = failedCode;
  });
  command.then((code) => {
    settled = true;
    if (code !== okCode) process.exit(code);
  });
}
