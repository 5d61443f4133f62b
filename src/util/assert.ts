// Why: invariants are checked in code, not hoped for. An assertion failure is a bug
// in deltavol (never a bad request or a failing disk), so it throws and is never caught
// as an expected error; expected failures use DeltavolError (errors.ts) instead.

export class AssertionError extends Error {
  override readonly name = 'AssertionError';
}

export function assert(condition: unknown, message = 'assertion failed'): asserts condition {
  if (!condition) throw new AssertionError(message);
}

export function unreachable(value: never, what = 'value'): never {
  throw new AssertionError(`unreachable: unexpected ${what} ${String(value)}`);
}
