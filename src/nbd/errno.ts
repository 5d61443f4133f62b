// Why: backends fail with system error codes (EIO, ENOSPC, ...); the wire has a short
// fixed list. One table maps them, as the spec asks (EDQUOT and EFBIG → ENOSPC).

import * as C from './constants.js';
import { errnoCode } from '../util/errors.js';

const TABLE: Record<string, number> = {
  EPERM: C.NBD_EPERM,
  EACCES: C.NBD_EPERM,
  EROFS: C.NBD_EPERM,
  EIO: C.NBD_EIO,
  ENOMEM: C.NBD_ENOMEM,
  EINVAL: C.NBD_EINVAL,
  ENOSPC: C.NBD_ENOSPC,
  EDQUOT: C.NBD_ENOSPC,
  EFBIG: C.NBD_ENOSPC,
  EOVERFLOW: C.NBD_EOVERFLOW,
  ENOTSUP: C.NBD_ENOTSUP,
  EOPNOTSUPP: C.NBD_ENOTSUP,
  ESHUTDOWN: C.NBD_ESHUTDOWN,
  VOLUME_READ_ONLY: C.NBD_EPERM,
  SHUTTING_DOWN: C.NBD_ESHUTDOWN,
};

export function nbdErrorFor(e: unknown): number {
  const code = errnoCode(e);
  return (code && TABLE[code]) || C.NBD_EIO;
}
