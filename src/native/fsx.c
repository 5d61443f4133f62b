/*
 * fsx: the few Linux file calls Node.js does not expose and a block server needs.
 * fallocate(2) to punch holes and zero ranges (TRIM, WRITE_ZEROES) and
 * lseek(2) SEEK_DATA / SEEK_HOLE to report real allocation (BLOCK_STATUS), and
 * posix_fadvise(2) WILLNEED for NBD_CMD_CACHE, and flock(2) so one daemon owns a data
 * directory. Also crc32c over a list of buffers with the CPU's crc32 instruction on three
 * streams at once (replicated data is checksummed at both ends: the library we use runs
 * one stream, about a third of the speed), exported only where the CPU has SSE 4.2.
 * preadRanges reads many (offset, length) ranges into one buffer in one call:
 * building a delta set reads tens of thousands of scattered 4 KiB blocks, and one
 * fs.readSync each cost more in JS and binding overhead than the pread itself;
 * pwriteRanges is its mirror for a replica playing such a set.
 * Each function is synchronous and tiny except preadScan, a threadpool pread that also
 * counts zero blocks (below); errors become JS exceptions whose
 * `code` is the errno name (EOPNOTSUPP, ENXIO, ...), as Node's own fs errors are.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <sys/file.h>
#include <linux/falloc.h>
#include <malloc.h>
#include <node_api.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

static const char *errno_name(int e) {
  switch (e) {
  case EOPNOTSUPP: return "EOPNOTSUPP";
  case ENXIO: return "ENXIO";
  case EBADF: return "EBADF";
  case EINVAL: return "EINVAL";
  case ENOSPC: return "ENOSPC";
  case EIO: return "EIO";
  case EFBIG: return "EFBIG";
  case EPERM: return "EPERM";
  case EINTR: return "EINTR";
  case ENODEV: return "ENODEV";
  case ESPIPE: return "ESPIPE";
  case ENOMEM: return "ENOMEM";
  case ECANCELED: return "ECANCELED";
  default: return "EUNKNOWN";
  }
}

static napi_value throw_errno(napi_env env, const char *syscall, int e) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s (%s)", syscall, strerror(e), errno_name(e));
  napi_throw_error(env, errno_name(e), msg);
  return NULL;
}

/* Reads argv[i] as an integer that fits a JS safe integer. */
static int get_i64(napi_env env, napi_value v, int64_t *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok) return 0;
  if (d < 0 || d > 9007199254740991.0) return 0;
  *out = (int64_t)d;
  return 1;
}

/* Reads (fd, offset, length) arguments; throws and returns 0 when they are not integers. */
static int get_range_args(napi_env env, napi_callback_info info, int64_t *fd, int64_t *off, int64_t *len) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 3 || !get_i64(env, argv[0], fd) || !get_i64(env, argv[1], off) || !get_i64(env, argv[2], len)) {
    napi_throw_type_error(env, "EINVAL", "expected (fd, offset, length) as non-negative integers");
    return 0;
  }
  return 1;
}

static napi_value do_fallocate(napi_env env, napi_callback_info info, int mode, const char *name) {
  int64_t fd, off, len;
  if (!get_range_args(env, info, &fd, &off, &len)) return NULL;
  int r;
  do {
    r = fallocate((int)fd, mode, (off_t)off, (off_t)len);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return throw_errno(env, name, errno);
  return NULL;
}

static napi_value punch_hole(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "fallocate(PUNCH_HOLE)");
}

static napi_value zero_range(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "fallocate(ZERO_RANGE)");
}

static napi_value allocate(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, 0, "fallocate");
}

/* lseek with SEEK_DATA or SEEK_HOLE; returns -1 when there is no such region (ENXIO). */
static napi_value do_seek(napi_env env, napi_callback_info info, int whence, const char *name) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t fd, off;
  if (argc < 2 || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[1], &off)) {
    napi_throw_type_error(env, "EINVAL", "expected (fd, offset) as non-negative integers");
    return NULL;
  }
  off_t r = lseek((int)fd, (off_t)off, whence);
  if (r < 0) {
    if (errno == ENXIO) r = -1;
    else return throw_errno(env, name, errno);
  }
  napi_value out;
  napi_create_double(env, (double)r, &out);
  return out;
}

static napi_value seek_data(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_DATA, "lseek(SEEK_DATA)");
}

static napi_value seek_hole(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_HOLE, "lseek(SEEK_HOLE)");
}

/* posix_fadvise(WILLNEED): start reading a range into the page cache (NBD_CMD_CACHE). */
static napi_value will_need(napi_env env, napi_callback_info info) {
  int64_t fd, off, len;
  if (!get_range_args(env, info, &fd, &off, &len)) return NULL;
  int r = posix_fadvise((int)fd, (off_t)off, (off_t)len, POSIX_FADV_WILLNEED);
  if (r != 0) return throw_errno(env, "posix_fadvise", r);
  return NULL;
}

/*
 * flock(LOCK_EX | LOCK_NB): true when this process now holds the lock, false when another
 * does. The kernel drops it when the holder dies, even by SIGKILL: no stale locks.
 */
static napi_value lock_exclusive(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t fd;
  if (argc < 1 || !get_i64(env, argv[0], &fd)) {
    napi_throw_type_error(env, "EINVAL", "expected (fd)");
    return NULL;
  }
  int r;
  do {
    r = flock((int)fd, LOCK_EX | LOCK_NB);
  } while (r < 0 && errno == EINTR);
  if (r < 0 && errno != EWOULDBLOCK) return throw_errno(env, "flock", errno);
  napi_value out;
  napi_get_boolean(env, r == 0, &out);
  return out;
}


/* ---- crc32c (Castagnoli), hardware, three interleaved streams -----------------------
 * Same function as @node-rs/crc32's crc32c: reflected, pre- and post-inverted, chainable
 * (crc32c(b, crc32c(a)) == crc32c(a ++ b)). The streams are combined by shifting a crc
 * over a run of zero bytes with precomputed tables (the method of Mark Adler's crc32c.c). */
#if defined(__x86_64__)
#include <nmmintrin.h>

#define CRC32C_POLY 0x82f63b78u
#define CRC32C_LONG 8192
#define CRC32C_SHORT 256

static uint32_t crc32c_long_tab[4][256];
static uint32_t crc32c_short_tab[4][256];
static int crc32c_hw_ok = 0;

static uint32_t gf2_times(const uint32_t *mat, uint32_t vec) {
  uint32_t sum = 0;
  while (vec) {
    if (vec & 1) sum ^= *mat;
    vec >>= 1;
    mat++;
  }
  return sum;
}

static void gf2_square(uint32_t *square, const uint32_t *mat) {
  for (int n = 0; n < 32; n++) square[n] = gf2_times(mat, mat[n]);
}

/* The operator that appends len zero bytes (len a power of two) to a crc state. */
static void crc32c_zeros_op(uint32_t *even, size_t len) {
  uint32_t odd[32];
  odd[0] = CRC32C_POLY;
  uint32_t row = 1;
  for (int n = 1; n < 32; n++) {
    odd[n] = row;
    row <<= 1;
  }
  gf2_square(even, odd); /* two zero bits */
  gf2_square(odd, even); /* four zero bits */
  do {
    gf2_square(even, odd);
    len >>= 1;
    if (len == 0) return;
    gf2_square(odd, even);
    len >>= 1;
  } while (len);
  memcpy(even, odd, sizeof odd);
}

static void crc32c_zeros(uint32_t zeros[][256], size_t len) {
  uint32_t op[32];
  crc32c_zeros_op(op, len);
  for (uint32_t n = 0; n < 256; n++) {
    zeros[0][n] = gf2_times(op, n);
    zeros[1][n] = gf2_times(op, n << 8);
    zeros[2][n] = gf2_times(op, n << 16);
    zeros[3][n] = gf2_times(op, n << 24);
  }
}

static inline uint32_t crc32c_shift(uint32_t zeros[][256], uint32_t crc) {
  return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^ zeros[2][(crc >> 16) & 0xff] ^ zeros[3][crc >> 24];
}

/*
 * While at least 3 * block bytes are left: crc32 of three consecutive blocks at once (the
 * instruction has a 3-cycle latency and 1-cycle throughput), then the second and third
 * streams folded into the first with the shift table for `block` bytes.
 */
__attribute__((target("sse4.2"))) static inline uint64_t crc32c_three_streams(uint64_t crc0, const unsigned char **at, size_t *left, size_t block, uint32_t tab[4][256]) {
  const unsigned char *next = *at;
  size_t len = *left;
  uint64_t crc1, crc2, w0, w1, w2;
  while (len >= block * 3) {
    crc1 = 0;
    crc2 = 0;
    const unsigned char *end = next + block;
    do {
      memcpy(&w0, next, 8);
      memcpy(&w1, next + block, 8);
      memcpy(&w2, next + 2 * block, 8);
      crc0 = _mm_crc32_u64(crc0, w0);
      crc1 = _mm_crc32_u64(crc1, w1);
      crc2 = _mm_crc32_u64(crc2, w2);
      next += 8;
    } while (next < end);
    crc0 = crc32c_shift(tab, (uint32_t)crc0) ^ crc1;
    crc0 = crc32c_shift(tab, (uint32_t)crc0) ^ crc2;
    next += block * 2;
    len -= block * 3;
  }
  *at = next;
  *left = len;
  return crc0;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const unsigned char *next, size_t len) {
  uint64_t crc0 = crc ^ 0xffffffffu, w0;
  while (len && ((uintptr_t)next & 7) != 0) {
    crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
    len--;
  }
  crc0 = crc32c_three_streams(crc0, &next, &len, CRC32C_LONG, crc32c_long_tab);
  crc0 = crc32c_three_streams(crc0, &next, &len, CRC32C_SHORT, crc32c_short_tab);
  while (len >= 8) {
    memcpy(&w0, next, 8);
    crc0 = _mm_crc32_u64(crc0, w0);
    next += 8;
    len -= 8;
  }
  while (len) {
    crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
    len--;
  }
  return (uint32_t)crc0 ^ 0xffffffffu;
}

/* crc32c(parts: Uint8Array[] | Uint8Array, initial: number) -> number */
static napi_value crc32c_parts(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t crc = 0;
  if (argc < 1 || (argc >= 2 && napi_get_value_uint32(env, argv[1], &crc) != napi_ok)) {
    napi_throw_type_error(env, "EINVAL", "expected (parts, initial crc)");
    return NULL;
  }
  bool is_array = false;
  napi_is_array(env, argv[0], &is_array);
  uint32_t count = 1;
  if (is_array) napi_get_array_length(env, argv[0], &count);
  for (uint32_t i = 0; i < count; i++) {
    napi_value part = argv[0];
    if (is_array && napi_get_element(env, argv[0], i, &part) != napi_ok) return NULL;
    bool is_ta = false;
    napi_is_typedarray(env, part, &is_ta);
    napi_typedarray_type type;
    size_t length = 0;
    void *data = NULL;
    if (!is_ta || napi_get_typedarray_info(env, part, &type, &length, &data, NULL, NULL) != napi_ok || type != napi_uint8_array) {
      napi_throw_type_error(env, "EINVAL", "crc32c: parts must be Uint8Arrays");
      return NULL;
    }
    if (length) crc = crc32c_hw(crc, data, length);
  }
  napi_value out;
  napi_create_uint32(env, crc, &out);
  return out;
}

static void crc32c_init(void) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("sse4.2")) return;
  crc32c_zeros(crc32c_long_tab, CRC32C_LONG);
  crc32c_zeros(crc32c_short_tab, CRC32C_SHORT);
  crc32c_hw_ok = 1;
}
#endif

/* copyRange(fdIn, posIn, fdOut, posOut, length) -> bytes copied: copy_file_range(2) in a
 * loop, so the data moves from file to file inside the kernel (no user buffer). Returns
 * fewer than length only at the end of the input file. */
static napi_value copy_range(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t fd_in, pos_in, fd_out, pos_out, len;
  if (argc < 5 || !get_i64(env, argv[0], &fd_in) || !get_i64(env, argv[1], &pos_in) || !get_i64(env, argv[2], &fd_out) ||
      !get_i64(env, argv[3], &pos_out) || !get_i64(env, argv[4], &len)) {
    napi_throw_type_error(env, "EINVAL", "expected (fdIn, posIn, fdOut, posOut, length) as non-negative integers");
    return NULL;
  }
  int64_t done = 0;
  while (done < len) {
    loff_t in = pos_in + done, out = pos_out + done;
    ssize_t n = copy_file_range((int)fd_in, &in, (int)fd_out, &out, (size_t)(len - done), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return throw_errno(env, "copy_file_range", errno);
    }
    if (n == 0) break;
    done += n;
  }
  napi_value result;
  napi_create_int64(env, done, &result);
  return result;
}

/* pread of len bytes at off into dst, whole (bytes past the end of the file read as zeroes): 0 or an errno. */
static int pread_all(int fd, char *dst, size_t len, off_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, dst + done, len - done, off + (off_t)done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) {
      memset(dst + done, 0, len - done); /* past the end of the file */
      break;
    }
    done += (size_t)n;
  }
  return 0;
}

/* The arguments of preadRanges and pwriteRanges: (fd, buffer, bufferOffset, ranges, count). */
typedef struct {
  int fd;
  char *data;      /* the buffer, from bufferOffset */
  const double *r; /* count (file offset, length) pairs */
  int64_t count;
  uint64_t bytes;  /* the ranges' lengths together */
} ranges_args;

/* Reads and checks them: every range is valid and all fit the buffer, before any byte moves.
 * False with a JS exception pending otherwise. */
static bool get_ranges_args(napi_env env, napi_callback_info info, const char *name, ranges_args *a) {
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t fd, at, count;
  void *data, *rdata;
  size_t len, rlen;
  napi_typedarray_type rtype;
  bool is_buf = false, is_ta = false;
  char msg[160];
  if (argc < 5 || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[2], &at) || !get_i64(env, argv[4], &count) ||
      napi_is_buffer(env, argv[1], &is_buf) != napi_ok || !is_buf || napi_is_typedarray(env, argv[3], &is_ta) != napi_ok || !is_ta) {
    snprintf(msg, sizeof msg, "%s: expected (fd, Buffer, offset in it, Float64Array ranges, count)", name);
    napi_throw_type_error(env, "EINVAL", msg);
    return false;
  }
  napi_get_buffer_info(env, argv[1], &data, &len);
  napi_get_typedarray_info(env, argv[3], &rtype, &rlen, &rdata, NULL, NULL);
  if (rtype != napi_float64_array || (size_t)count * 2 > rlen) {
    snprintf(msg, sizeof msg, "%s: ranges must be a Float64Array of at least 2 * count numbers", name);
    napi_throw_type_error(env, "EINVAL", msg);
    return false;
  }
  const double *r = (const double *)rdata;
  uint64_t pos = (uint64_t)at;
  for (int64_t i = 0; i < count; i++) {
    double o = r[2 * i], l = r[2 * i + 1];
    if (!(o >= 0 && o <= 9007199254740991.0 && l >= 0 && l <= (double)len) || pos + (uint64_t)l > len) {
      snprintf(msg, sizeof msg, "%s: a range is negative or does not fit the buffer", name);
      napi_throw_range_error(env, "EINVAL", msg);
      return false;
    }
    pos += (uint64_t)l;
  }
  if ((uint64_t)at > len) {
    snprintf(msg, sizeof msg, "%s: the offset is past the end of the buffer", name);
    napi_throw_range_error(env, "EINVAL", msg);
    return false;
  }
  a->fd = (int)fd;
  a->data = (char *)data + at;
  a->r = r;
  a->count = count;
  a->bytes = pos - (uint64_t)at;
  return true;
}

/*
 * Ranges that follow each other in the file with at most this many bytes between them are
 * read with one preadv(2), the bytes between them into gap_scratch, which nobody reads: set
 * building reads the changed blocks of a set, and after random 4 KiB writes most runs are a
 * block or two with a block or two between them, so one syscall each cost more than the
 * copy of the gaps (a 4 KiB pread ~1 µs, a 4 KiB copy ~0.3 µs).
 */
#define RANGES_GAP_BYTES_MAX (16 * 1024)
#define RANGES_IOV_MAX 256
static char gap_scratch[RANGES_GAP_BYTES_MAX];

/*
 * preadRanges(fd, target, targetOffset, ranges, count): reads `count` ranges, ranges being
 * a Float64Array of (file offset, length) pairs, one after the other into target from
 * targetOffset. Bytes past the end of the file read as zeroes. Returns the bytes placed.
 */
static napi_value pread_ranges(napi_env env, napi_callback_info info) {
  ranges_args a;
  if (!get_ranges_args(env, info, "preadRanges", &a)) return NULL;
  struct iovec iov[RANGES_IOV_MAX];
  char *dst = a.data;
  for (int64_t i = 0; i < a.count;) {
    /* One group: ranges [i, j) in file order with small gaps, read with one preadv. */
    const off_t start = (off_t)a.r[2 * i];
    off_t end = start;
    char *d = dst;
    size_t total = 0;
    int n = 0;
    int64_t j = i;
    while (j < a.count && n + 2 <= RANGES_IOV_MAX) {
      const off_t o = (off_t)a.r[2 * j];
      const size_t l = (size_t)a.r[2 * j + 1];
      if (j > i) {
        if (o < end || o - end > RANGES_GAP_BYTES_MAX) break;
        if (o > end) {
          iov[n].iov_base = gap_scratch;
          iov[n++].iov_len = (size_t)(o - end);
          total += (size_t)(o - end);
        }
      }
      if (l > 0) {
        iov[n].iov_base = d;
        iov[n++].iov_len = l;
      }
      total += l;
      d += l;
      end = o + (off_t)l;
      j++;
    }
    ssize_t got = n == 0 ? 0 : preadv(a.fd, iov, n, start);
    while (got < 0 && errno == EINTR) got = preadv(a.fd, iov, n, start);
    if (got < 0) return throw_errno(env, "preadv", errno);
    if ((size_t)got < total) {
      /* Short (the end of the file, or a signal): range by range, past the end as zeroes. */
      d = dst;
      for (int64_t k = i; k < j; k++) {
        const size_t l = (size_t)a.r[2 * k + 1];
        int e = pread_all(a.fd, d, l, (off_t)a.r[2 * k]);
        if (e != 0) return throw_errno(env, "pread", e);
        d += l;
      }
    }
    dst = d;
    i = j;
  }
  napi_value out;
  napi_create_double(env, (double)a.bytes, &out);
  return out;
}

/*
 * preadScan(fd, target, targetOffset, length, position, blockBytes): a pread of `length`
 * bytes into target at targetOffset in the threadpool (past the end of the file reads as
 * zeroes), which also counts the blocks of blockBytes (from targetOffset; the last may be
 * shorter) that are all zero, or skips that with blockBytes 0. Returns a Promise of the
 * count (-1 when skipped); a failed pread rejects with an Error whose code is the errno
 * name. Why: an NBD READ sends runs of zero blocks as holes, and scanning a fresh 1 MiB
 * from the event loop cost it a cache miss per page (~6 µs of loop per read, fio 1 MiB
 * reads on four connections, 2026-12-07); here the thread that just wrote the bytes scans
 * them while they are in its cache. The target stays referenced until the promise settles.
 */
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref target_ref;
  int fd;
  char *dst;
  size_t length;
  off_t position;
  size_t block_bytes;
  int err;
  int64_t zero_blocks;
} pread_scan_job;

static bool all_zero(const char *p, size_t n) {
  /* The first word decides for most data; the rest compares 8 bytes at a time. */
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    if (w != 0) return false;
  }
  for (; i < n; i++) if (p[i] != 0) return false;
  return true;
}

static void pread_scan_execute(napi_env env, void *data) {
  (void)env;
  pread_scan_job *j = data;
  j->err = pread_all(j->fd, j->dst, j->length, j->position);
  if (j->err != 0) return;
  if (j->block_bytes == 0) {
    j->zero_blocks = -1;
    return;
  }
  int64_t zeros = 0;
  for (size_t at = 0; at < j->length; at += j->block_bytes) {
    size_t n = j->length - at < j->block_bytes ? j->length - at : j->block_bytes;
    if (all_zero(j->dst + at, n)) zeros++;
  }
  j->zero_blocks = zeros;
}

static void pread_scan_complete(napi_env env, napi_status status, void *data) {
  pread_scan_job *j = data;
  napi_value out;
  if (status != napi_ok && j->err == 0) j->err = ECANCELED;
  if (j->err != 0) {
    char msg[160];
    snprintf(msg, sizeof msg, "pread: %s (%s)", strerror(j->err), errno_name(j->err));
    napi_value code, text;
    napi_create_string_utf8(env, errno_name(j->err), NAPI_AUTO_LENGTH, &code);
    napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &text);
    napi_create_error(env, code, text, &out);
    napi_reject_deferred(env, j->deferred, out);
  } else {
    napi_create_double(env, (double)j->zero_blocks, &out);
    napi_resolve_deferred(env, j->deferred, out);
  }
  napi_delete_reference(env, j->target_ref);
  napi_delete_async_work(env, j->work);
  free(j);
}

static napi_value pread_scan(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t fd, at, length, position, block;
  void *tdata;
  size_t tlen;
  bool is_buf = false;
  if (argc < 6 || !get_i64(env, argv[0], &fd) || !get_i64(env, argv[2], &at) || !get_i64(env, argv[3], &length) ||
      !get_i64(env, argv[4], &position) || !get_i64(env, argv[5], &block) ||
      napi_is_buffer(env, argv[1], &is_buf) != napi_ok || !is_buf) {
    napi_throw_type_error(env, "EINVAL", "expected (fd, Buffer, targetOffset, length, position, blockBytes)");
    return NULL;
  }
  napi_get_buffer_info(env, argv[1], &tdata, &tlen);
  if (fd < 0 || at < 0 || length < 0 || position < 0 || block < 0 || (uint64_t)at + (uint64_t)length > tlen) {
    napi_throw_range_error(env, "EINVAL", "preadScan: the range does not fit the target");
    return NULL;
  }
  pread_scan_job *j = calloc(1, sizeof *j);
  if (j == NULL) return throw_errno(env, "calloc", ENOMEM);
  j->fd = (int)fd;
  j->dst = (char *)tdata + at;
  j->length = (size_t)length;
  j->position = (off_t)position;
  j->block_bytes = (size_t)block;
  napi_value promise, name;
  napi_create_string_utf8(env, "deltavol.preadScan", NAPI_AUTO_LENGTH, &name);
  if (napi_create_promise(env, &j->deferred, &promise) != napi_ok ||
      napi_create_reference(env, argv[1], 1, &j->target_ref) != napi_ok ||
      napi_create_async_work(env, NULL, name, pread_scan_execute, pread_scan_complete, j, &j->work) != napi_ok ||
      napi_queue_async_work(env, j->work) != napi_ok) {
    napi_throw_error(env, "EIO", "preadScan: could not queue the work");
    return NULL; /* the job leaks (a bug in our use of N-API, not a runtime condition) */
  }
  return promise;
}

/*
 * pwriteRanges(fd, source, sourceOffset, ranges, count): writes `count` ranges, ranges being
 * a Float64Array of (file offset, length) pairs, taking their bytes one after the other from
 * source at sourceOffset. Returns the bytes written. A replica plays a chunk of scattered
 * 4 KiB blocks; one fs.writeSync each cost more in JS and binding overhead than the pwrite.
 */
static napi_value pwrite_ranges(napi_env env, napi_callback_info info) {
  ranges_args a;
  if (!get_ranges_args(env, info, "pwriteRanges", &a)) return NULL;
  const char *src = a.data;
  for (int64_t i = 0; i < a.count; i++) {
    size_t len = (size_t)a.r[2 * i + 1], done = 0;
    off_t off = (off_t)a.r[2 * i];
    while (done < len) {
      ssize_t n = pwrite(a.fd, src + done, len - done, off + (off_t)done);
      if (n < 0) {
        if (errno == EINTR) continue;
        return throw_errno(env, "pwrite", errno);
      }
      done += (size_t)n;
    }
    src += len;
  }
  napi_value out;
  napi_create_double(env, (double)a.bytes, &out);
  return out;
}

/* mallocTrim() -> 1 if memory was given back: malloc_trim(0). Large buffers freed by the
 * garbage collector go back to malloc, and glibc keeps freed heap memory (the daemon's
 * RSS stayed at its peak after a burst of 1 MiB requests); this returns it to the kernel. */
static napi_value malloc_trim_fn(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value out;
  napi_create_int32(env, malloc_trim(0), &out);
  return out;
}

/* mallocTune(trimThresholdBytes, mmapThresholdBytes) -> 1 if glibc took both. By default
 * glibc gives a large freed buffer back at once (munmap, or a heap trim past a threshold
 * that follows the largest buffer freed: ~2 MiB), so a daemon that frees 1 MiB chunk and
 * socket buffers after every collection takes them again as fresh pages: a page fault and
 * a zeroed page per 4 KiB (15% of a replicating primary's CPU, perf 2026-12-06). Fixed
 * thresholds keep that memory in the heap; mallocTrim() still returns it when quiet. */
static napi_value malloc_tune_fn(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  double trim = 0, mmap_at = 0;
  if (argc < 2 || napi_get_value_double(env, argv[0], &trim) != napi_ok || napi_get_value_double(env, argv[1], &mmap_at) != napi_ok ||
      !(trim >= 0 && trim <= 1073741824.0) || !(mmap_at >= 0 && mmap_at <= 1073741824.0)) {
    napi_throw_range_error(env, "EINVAL_ARGUMENT", "mallocTune(trimThresholdBytes, mmapThresholdBytes): two byte counts up to 1 GiB");
    return NULL;
  }
  int ok = mallopt(M_TRIM_THRESHOLD, (int)trim) == 1 && mallopt(M_MMAP_THRESHOLD, (int)mmap_at) == 1;
  napi_value out;
  napi_create_int32(env, ok, &out);
  return out;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL},
    {"zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_default, NULL},
    {"allocate", NULL, allocate, NULL, NULL, NULL, napi_default, NULL},
    {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_default, NULL},
    {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_default, NULL},
    {"willNeed", NULL, will_need, NULL, NULL, NULL, napi_default, NULL},
    {"lockExclusive", NULL, lock_exclusive, NULL, NULL, NULL, napi_default, NULL},
    {"copyRange", NULL, copy_range, NULL, NULL, NULL, napi_default, NULL},
    {"preadRanges", NULL, pread_ranges, NULL, NULL, NULL, napi_default, NULL},
    {"pwriteRanges", NULL, pwrite_ranges, NULL, NULL, NULL, napi_default, NULL},
    {"preadScan", NULL, pread_scan, NULL, NULL, NULL, napi_default, NULL},
    {"mallocTrim", NULL, malloc_trim_fn, NULL, NULL, NULL, napi_default, NULL},
    {"mallocTune", NULL, malloc_tune_fn, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
#if defined(__x86_64__)
  crc32c_init();
  if (crc32c_hw_ok) {
    napi_property_descriptor crc[] = {{"crc32c", NULL, crc32c_parts, NULL, NULL, NULL, napi_default, NULL}};
    napi_define_properties(env, exports, 1, crc);
  }
#endif
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
