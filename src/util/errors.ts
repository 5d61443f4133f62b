// Why: expected failures (bad input, missing volume, disk full, peer gone) carry a fixed
// code so callers (the CLI, the control API, the NBD errno mapping) can act on them
// without parsing messages. Bugs are assertions (assert.ts), not these.

export type ErrorCode =
  | 'EINVAL_ARGUMENT'
  | 'VOLUME_NOT_FOUND'
  | 'VOLUME_EXISTS'
  | 'VOLUME_BUSY'
  | 'VOLUME_READ_ONLY'
  | 'VOLUME_SHRINK'
  | 'BAD_NAME'
  | 'BAD_SIZE'
  | 'DATA_DIR'
  | 'METADATA_CORRUPT'
  | 'DAEMON_UNREACHABLE'
  | 'CONTROL_API'
  | 'SHUTTING_DOWN'
  | 'IO'
  | 'SNAPSHOT_NOT_FOUND'
  | 'SNAPSHOT_EXISTS'
  | 'SNAPSHOT_INVALID'
  | 'SNAPSHOTS_MAX'
  | 'SAVE_AREA_FULL'
  | 'DELTA_SET_BUSY'
  | 'BAD_STREAM'
  /** The operation does not fit the volume's replication role (a replica written, a fenced primary shipping). */
  | 'ROLE_CONFLICT'
  /** The peer holds a newer generation of the volume: this side was replaced. */
  | 'STALE_GENERATION'
  /** Sizes or tracking blocks of the two volumes differ. */
  | 'GEOMETRY'
  /** The peer answered and said no (the reason is in the message and details). */
  | 'PEER_REFUSED'
  /** The peer could not be reached (connect failed, timed out, link lost). */
  | 'PEER_UNREACHABLE'
  /** NBD TLS settings that cannot work (a missing or unreadable key, a bad PSK file, flags that contradict). */
  | 'TLS_CONFIG'
  /** Control API: no bearer token, or not the daemon's. */
  | 'UNAUTHORIZED'
  /** Control API: a request a browser sent (Origin), or for another host name (DNS rebinding). */
  | 'FORBIDDEN'
  /** Control API: a body that is not the content type the route takes. */
  | 'UNSUPPORTED_MEDIA_TYPE'
  /** Control API: a request body over the limit. */
  | 'BODY_TOO_LARGE';

export class DeltavolError extends Error {
  override readonly name = 'DeltavolError';
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly details?: Record<string, unknown>,
  ) {
    super(message);
  }
}

export function isDeltavolError(e: unknown, code?: ErrorCode): e is DeltavolError {
  return e instanceof DeltavolError && (code === undefined || e.code === code);
}

/** Node's system errors carry an errno name in `code`. */
export function errnoCode(e: unknown): string | undefined {
  if (e && typeof e === 'object' && 'code' in e && typeof (e as { code: unknown }).code === 'string') {
    return (e as { code: string }).code;
  }
  return undefined;
}

/** An error shaped like Node's system errors (`code` = errno name), for the NBD errno mapping. */
export function systemError(code: string, message: string): Error & { code: string } {
  return Object.assign(new Error(message), { code });
}
