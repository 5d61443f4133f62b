/*
 * pipex: receives a large WRITE payload from its socket into a kernel pipe with splice(2),
 * and moves it from the pipe into the volume's file with splice(2) again. A read(2) into
 * a buffer and a pwrite(2) from it copy every byte twice; splice from a TCP socket only
 * takes references to the received pages, so the one copy left is the file's (a C
 * receiver of 1 MiB writes on loopback into tmpfs, 2026-12-07: 197-250 against 307-359 µs
 * of CPU per MiB, 4.1-5.3 against 2.9-3.4 GB/s).
 *
 * A pipe holds a number of slots, not bytes: splice from a TCP socket puts each received
 * fragment in a slot of its own, however short, so a client that sends in tiny pieces can
 * fill a pipe long before its payload is in (pipedPayloadBytesMax in limits.ts has what a
 * 1 MiB pipe took). Callers handle PIPE_FULL: splice would block while the socket holds data.
 *
 * A receiver waits for the socket's data with a uv_poll on a dup(2) of the socket (libuv
 * keeps one watcher per descriptor; the socket's own handle is read-stopped meanwhile, so
 * only one reader takes its bytes). Its callback runs on the loop with what it moved.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <node_api.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>
#include <uv.h>

/* Buffers one pipeWrite takes. */
#define WRITE_IOV_MAX 64

static const char *errno_name(int e) {
  switch (e) {
  case EAGAIN: return "EAGAIN";
  case EBADF: return "EBADF";
  case EINVAL: return "EINVAL";
  case EIO: return "EIO";
  case ENOSPC: return "ENOSPC";
  case EDQUOT: return "EDQUOT";
  case EFBIG: return "EFBIG";
  case ENOMEM: return "ENOMEM";
  case EPERM: return "EPERM";
  case EMFILE: return "EMFILE";
  case ENFILE: return "ENFILE";
  case EPIPE: return "EPIPE";
  case ECONNRESET: return "ECONNRESET";
  case ETIMEDOUT: return "ETIMEDOUT";
  case ENOTCONN: return "ENOTCONN";
  case EROFS: return "EROFS";
  default: return "EIO";
  }
}

static int throw_errno(napi_env env, int e, const char *what) {
  napi_throw_error(env, errno_name(e), what);
  return -1;
}

static int arg_int(napi_env env, napi_value v, int *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || !(d >= 0 && d < 2147483647.0) || d != (double)(int)d) return -1;
  *out = (int)d;
  return 0;
}

static int arg_i64(napi_env env, napi_value v, int64_t *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || !(d >= 0 && d <= 9007199254740991.0) || d != (double)(int64_t)d) return -1;
  *out = (int64_t)d;
  return 0;
}

static napi_value num(napi_env env, double d) {
  napi_value out;
  napi_create_double(env, d, &out);
  return out;
}

/* pipeOpen(capacityBytes) -> [readFd, writeFd], both non-blocking and close-on-exec, the
 * pipe holding at least capacityBytes (F_SETPIPE_SZ; EPERM above fs.pipe-max-size or the
 * user's pipe page limits). */
static napi_value pipe_open(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int cap;
  if (argc < 1 || arg_int(env, argv[0], &cap) != 0 || cap < 4096) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "pipeOpen(capacityBytes >= 4096)");
    return NULL;
  }
  int p[2];
  if (pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0) {
    throw_errno(env, errno, "pipe2 failed");
    return NULL;
  }
  int got = fcntl(p[1], F_SETPIPE_SZ, cap);
  if (got < cap) {
    int e = got < 0 ? errno : ENOMEM;
    close(p[0]);
    close(p[1]);
    throw_errno(env, e, "fcntl(F_SETPIPE_SZ) failed");
    return NULL;
  }
  napi_value out, r, w;
  napi_create_array_with_length(env, 2, &out);
  napi_create_int32(env, p[0], &r);
  napi_create_int32(env, p[1], &w);
  napi_set_element(env, out, 0, r);
  napi_set_element(env, out, 1, w);
  return out;
}

/* pipeWrite(writeFd, buffers) -> bytes written (writev; fewer when the pipe is full). */
static napi_value pipe_write(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int fd;
  uint32_t n = 0;
  bool is_array = false;
  if (argc < 2 || arg_int(env, argv[0], &fd) != 0 || napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array ||
      napi_get_array_length(env, argv[1], &n) != napi_ok || n > WRITE_IOV_MAX) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "pipeWrite(fd, buffers (at most 64))");
    return NULL;
  }
  struct iovec iov[WRITE_IOV_MAX];
  for (uint32_t i = 0; i < n; i++) {
    napi_value b;
    void *data;
    size_t len;
    if (napi_get_element(env, argv[1], i, &b) != napi_ok || napi_get_buffer_info(env, b, &data, &len) != napi_ok) {
      napi_throw_type_error(env, "EINVAL_ARGUMENT", "pipeWrite: buffers must be Buffers");
      return NULL;
    }
    iov[i].iov_base = data;
    iov[i].iov_len = len;
  }
  if (n == 0) return num(env, 0);
  ssize_t w;
  do w = writev(fd, iov, (int)n);
  while (w < 0 && errno == EINTR);
  if (w < 0) {
    if (errno == EAGAIN) return num(env, 0);
    throw_errno(env, errno, "writev to a pipe failed");
    return NULL;
  }
  return num(env, (double)w);
}

/* pipeRead(readFd, target, targetOffset, length) -> bytes read (stops early when the pipe is empty). */
static napi_value pipe_read(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int fd;
  int64_t off, len;
  void *data;
  size_t size;
  if (argc < 4 || arg_int(env, argv[0], &fd) != 0 || napi_get_buffer_info(env, argv[1], &data, &size) != napi_ok ||
      arg_i64(env, argv[2], &off) != 0 || arg_i64(env, argv[3], &len) != 0 || (uint64_t)(off + len) > size) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "pipeRead(fd, target, targetOffset, length) within target");
    return NULL;
  }
  int64_t done = 0;
  while (done < len) {
    ssize_t r = read(fd, (char *)data + off + done, (size_t)(len - done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EAGAIN) break;
    if (r < 0) {
      throw_errno(env, errno, "read from a pipe failed");
      return NULL;
    }
    if (r == 0) break;
    done += r;
  }
  return num(env, (double)done);
}

/* Moves exactly len bytes from pipe fd_in into file fd_out at off; 0 or an errno (EAGAIN:
 * the pipe held fewer). */
static int splice_all(int fd_in, int fd_out, int64_t off, int64_t len) {
  int64_t done = 0;
  while (done < len) {
    loff_t at = (loff_t)(off + done);
    ssize_t n = splice(fd_in, NULL, fd_out, &at, (size_t)(len - done), SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) return EAGAIN;
    done += n;
  }
  return 0;
}

static int file_args(napi_env env, napi_callback_info info, napi_value *argv, int *pfd, int *ffd, int64_t *off, int64_t *len) {
  size_t argc = 4;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 4 || arg_int(env, argv[0], pfd) != 0 || arg_int(env, argv[1], ffd) != 0 || arg_i64(env, argv[2], off) != 0 ||
      arg_i64(env, argv[3], len) != 0) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "spliceToFile(pipeFd, fileFd, offset, length)");
    return -1;
  }
  return 0;
}

/* spliceToFile(pipeFd, fileFd, offset, length): moves the bytes on this thread. */
static napi_value splice_to_file(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int pfd, ffd;
  int64_t off, len;
  if (file_args(env, info, argv, &pfd, &ffd, &off, &len) != 0) return NULL;
  int e = splice_all(pfd, ffd, off, len);
  if (e != 0) throw_errno(env, e, "splice from a pipe to a file failed");
  return NULL;
}

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int pfd, ffd;
  int64_t off, len;
  int error;
} file_job;

static void file_job_execute(napi_env env, void *data) {
  (void)env;
  file_job *j = data;
  j->error = splice_all(j->pfd, j->ffd, j->off, j->len);
}

static void file_job_complete(napi_env env, napi_status status, void *data) {
  file_job *j = data;
  int e = status != napi_ok ? EIO : j->error;
  if (e == 0) {
    napi_value u;
    napi_get_undefined(env, &u);
    napi_resolve_deferred(env, j->deferred, u);
  } else {
    napi_value msg, code, err;
    napi_create_string_utf8(env, "splice from a pipe to a file failed", NAPI_AUTO_LENGTH, &msg);
    napi_create_string_utf8(env, errno_name(e), NAPI_AUTO_LENGTH, &code);
    napi_create_error(env, code, msg, &err);
    napi_reject_deferred(env, j->deferred, err);
  }
  napi_delete_async_work(env, j->work);
  free(j);
}

/* spliceToFileAsync(pipeFd, fileFd, offset, length) -> Promise, in the threadpool. */
static napi_value splice_to_file_async(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int pfd, ffd;
  int64_t off, len;
  if (file_args(env, info, argv, &pfd, &ffd, &off, &len) != 0) return NULL;
  file_job *j = calloc(1, sizeof *j);
  if (!j) {
    napi_throw_error(env, "ENOMEM", "spliceToFileAsync: out of memory");
    return NULL;
  }
  j->pfd = pfd;
  j->ffd = ffd;
  j->off = off;
  j->len = len;
  napi_value promise, name;
  napi_create_promise(env, &j->deferred, &promise);
  napi_create_string_utf8(env, "deltavol.spliceToFile", NAPI_AUTO_LENGTH, &name);
  if (napi_create_async_work(env, NULL, name, file_job_execute, file_job_complete, j, &j->work) != napi_ok ||
      napi_queue_async_work(env, j->work) != napi_ok) {
    free(j);
    napi_throw_error(env, "EIO", "spliceToFileAsync: could not queue the work");
    return NULL;
  }
  return promise;
}

/* ---- receivers ---- */

typedef struct {
  uv_poll_t poll;
  napi_env env;
  napi_ref cb;
  napi_async_context ctx;
  int fd;       /* a dup of the socket, owned */
  int pipe_w;   /* where bytes go while armed */
  int64_t left; /* bytes still to move while armed */
  int64_t moved;
  int armed;
  int closed;        /* receiverClose ran, or the handle was collected without it */
  int handle_closed; /* libuv is done with the poll handle */
  int finalized;     /* the JS handle was collected */
} receiver;

/* Moves up to r->left bytes from the socket into the pipe without blocking. Returns 0 when
 * it can wait for more (or is done: left == 0), else the end: -1 EOF, -2 pipe full, or an errno. */
static int receive_some(receiver *r) {
  int retried = 0;
  while (r->left > 0) {
    ssize_t n = splice(r->fd, NULL, r->pipe_w, NULL, (size_t)r->left, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n > 0) {
      r->left -= n;
      r->moved += n;
      retried = 0;
      continue;
    }
    if (n == 0) return -1; /* the peer closed its side */
    if (errno == EINTR) continue;
    if (errno != EAGAIN) return errno;
    /* EAGAIN: no data, or no room in the pipe. Data waiting in the socket means no room
     * (once more first: it may have arrived between the two calls). */
    int queued = 0;
    if (ioctl(r->fd, FIONREAD, &queued) != 0 || queued <= 0) return 0;
    if (retried) return -2;
    retried = 1;
  }
  return 0;
}

static void receiver_call(receiver *r, int end) {
  napi_env env = r->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value cb, recv, argv[2];
  napi_get_reference_value(env, r->cb, &cb);
  napi_get_global(env, &recv); /* (MakeCallback wants an object as the receiver) */
  argv[0] = num(env, (double)r->moved);
  if (end == 0) napi_get_null(env, &argv[1]);
  else napi_create_string_utf8(env, end == -1 ? "EOF" : end == -2 ? "PIPE_FULL" : errno_name(end), NAPI_AUTO_LENGTH, &argv[1]);
  napi_value result;
  if (napi_make_callback(env, r->ctx, recv, cb, 2, argv, &result) != napi_ok) {
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (pending) {
      napi_value ex;
      napi_get_and_clear_last_exception(env, &ex);
      napi_fatal_exception(env, ex);
    }
  }
  napi_close_handle_scope(env, scope);
}

static void on_readable(uv_poll_t *h, int status, int events) {
  (void)events;
  receiver *r = h->data;
  if (!r->armed) return;
  int end = status < 0 ? EIO : receive_some(r);
  if (end == 0 && r->left > 0) return;
  r->armed = 0;
  uv_poll_stop(&r->poll);
  receiver_call(r, end);
}

static receiver *receiver_arg(napi_env env, napi_value v) {
  void *p = NULL;
  napi_valuetype t = napi_undefined;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &p) != napi_ok) return NULL;
  receiver *r = p;
  return r->closed ? NULL : r;
}

static void receiver_closed(uv_handle_t *h) {
  receiver *r = h->data;
  close(r->fd);
  r->handle_closed = 1;
  if (r->finalized) free(r);
}

/* The JS handle was collected: frees the receiver once libuv is done with it too (closing
 * it here if receiverClose never ran; its callback reference then stays, a small leak). */
static void receiver_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  receiver *r = data;
  r->finalized = 1;
  if (!r->closed) {
    r->closed = 1;
    r->armed = 0;
    uv_close((uv_handle_t *)&r->poll, receiver_closed);
  } else if (r->handle_closed) {
    free(r);
  }
}

/* receiverOpen(socketFd, callback) -> handle. callback(moved, end) runs on the loop when an
 * armed receive ends: end null (all moved), "EOF", "PIPE_FULL" or an errno name; moved
 * counts the bytes of that receive. The receiver watches a dup of socketFd, closed with it. */
static napi_value receiver_open(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int fd;
  napi_valuetype t = napi_undefined;
  if (argc < 2 || arg_int(env, argv[0], &fd) != 0 || napi_typeof(env, argv[1], &t) != napi_ok || t != napi_function) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "receiverOpen(socketFd, callback)");
    return NULL;
  }
  uv_loop_t *loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) {
    napi_throw_error(env, "EIO", "receiverOpen: no event loop");
    return NULL;
  }
  receiver *r = calloc(1, sizeof *r);
  if (!r) {
    napi_throw_error(env, "ENOMEM", "receiverOpen: out of memory");
    return NULL;
  }
  r->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (r->fd < 0) {
    int e = errno;
    free(r);
    throw_errno(env, e, "receiverOpen: dup failed");
    return NULL;
  }
  if (uv_poll_init(loop, &r->poll, r->fd) != 0) {
    close(r->fd);
    free(r);
    napi_throw_error(env, "EIO", "receiverOpen: uv_poll_init failed");
    return NULL;
  }
  r->poll.data = r;
  r->env = env;
  napi_value name, out;
  napi_create_string_utf8(env, "deltavol.receive", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, NULL, name, &r->ctx);
  napi_create_reference(env, argv[1], 1, &r->cb);
  napi_create_external(env, r, receiver_finalize, NULL, &out);
  return out;
}

/* receiverStart(handle, pipeWriteFd, bytes) -> bytes moved now. When fewer than `bytes`
 * (and no end was met), the receiver is armed and its callback tells the rest; when an end
 * was met at once (EOF, PIPE_FULL, an error), it is armed too and the callback tells it on
 * the next turn of the loop. */
static napi_value receiver_start(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  receiver *r = argc >= 3 ? receiver_arg(env, argv[0]) : NULL;
  int pw;
  int64_t bytes;
  if (!r || r->armed || arg_int(env, argv[1], &pw) != 0 || arg_i64(env, argv[2], &bytes) != 0 || bytes == 0) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "receiverStart(open idle receiver, pipeWriteFd, bytes > 0)");
    return NULL;
  }
  r->pipe_w = pw;
  r->left = bytes;
  r->moved = 0;
  int end = receive_some(r);
  int64_t now = r->moved;
  if (end == 0 && r->left == 0) return num(env, (double)now);
  r->moved = 0;
  r->armed = 1;
  /* Readable (or hung up / failed) wakes the poll; an end met now is met again then, except
   * a full pipe, which stays full: wake at once on the socket's queued data. */
  if (uv_poll_start(&r->poll, UV_READABLE | UV_DISCONNECT, on_readable) != 0) {
    r->armed = 0;
    napi_throw_error(env, "EIO", "receiverStart: uv_poll_start failed");
    return NULL;
  }
  return num(env, (double)now);
}

/* receiverMoved(handle) -> bytes the armed receive has moved so far (0 when idle). */
static napi_value receiver_moved(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  receiver *r = argc >= 1 ? receiver_arg(env, argv[0]) : NULL;
  if (!r) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "receiverMoved(open receiver)");
    return NULL;
  }
  return num(env, r->armed ? (double)r->moved : 0);
}

/* receiverClose(handle): stops it (no callback after this) and frees it. */
static napi_value receiver_close(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  receiver *r = argc >= 1 ? receiver_arg(env, argv[0]) : NULL;
  if (!r) return NULL;
  r->closed = 1;
  r->armed = 0;
  napi_delete_reference(env, r->cb);
  napi_async_destroy(env, r->ctx);
  uv_close((uv_handle_t *)&r->poll, receiver_closed);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"pipeOpen", NULL, pipe_open, NULL, NULL, NULL, napi_default, NULL},
    {"pipeWrite", NULL, pipe_write, NULL, NULL, NULL, napi_default, NULL},
    {"pipeRead", NULL, pipe_read, NULL, NULL, NULL, napi_default, NULL},
    {"spliceToFile", NULL, splice_to_file, NULL, NULL, NULL, napi_default, NULL},
    {"spliceToFileAsync", NULL, splice_to_file_async, NULL, NULL, NULL, napi_default, NULL},
    {"receiverOpen", NULL, receiver_open, NULL, NULL, NULL, napi_default, NULL},
    {"receiverStart", NULL, receiver_start, NULL, NULL, NULL, napi_default, NULL},
    {"receiverClose", NULL, receiver_close, NULL, NULL, NULL, napi_default, NULL},
    {"receiverMoved", NULL, receiver_moved, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
