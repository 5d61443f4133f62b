/*
 * sockx: sends a large reply on a socket from the libuv threadpool instead of the event loop.
 * Node writes every socket buffer on its one event loop; on loopback a writev of 1 MiB also
 * runs the receiver's TCP work, and `perf` of 1 MiB reads on four NBD connections put 75% of
 * the loop there (47% of the daemon) while the other core sat half idle. A reply sent here
 * runs on a threadpool thread, so several connections' sends run at once on both cores.
 *
 * sendv(fd, buffers, waitMs, callback): one threadpool job that hands the buffers to
 * sendmsg(2) with MSG_DONTWAIT | MSG_NOSIGNAL until all are taken, or the socket has stayed
 * full for waitMs (0: not at all; a thread waits at most that long, in poll(2)).
 * callback(errorCode | null, bytesSent) runs on the loop; the caller sends what was not
 * taken through its usual path. The caller passes a dup(2) of
 * the socket (dupFd), so a socket that Node closes meanwhile is never a reused descriptor.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <poll.h>
#include <time.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/* Buffers one sendv call takes: a reply is a header and its data, or a few chunks. */
#define SEND_BUFFERS_MAX 64
/* The longest a send may wait for room in the socket. */
#define SEND_WAIT_MS_MAX 1000

typedef struct {
  napi_async_work work;
  napi_ref buffers_ref; /* keeps the buffers alive while a thread reads them */
  napi_ref callback_ref;
  int fd;
  int wait_ms;
  int iov_count;
  struct iovec iov[SEND_BUFFERS_MAX];
  size_t sent;
  int error;
} send_job;

static const char *send_errno_name(int e) {
  switch (e) {
  case EPIPE: return "EPIPE";
  case ECONNRESET: return "ECONNRESET";
  case EBADF: return "EBADF";
  case ENOTSOCK: return "ENOTSOCK";
  case ENOBUFS: return "ENOBUFS";
  case ENOMEM: return "ENOMEM";
  case ETIMEDOUT: return "ETIMEDOUT";
  default: return "EIO";
  }
}

static int64_t now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void send_execute(napi_env env, void *data) {
  (void)env;
  send_job *j = data;
  int at = 0;
  const int64_t deadline = now_ms() + j->wait_ms;
  while (at < j->iov_count) {
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = j->iov + at;
    m.msg_iovlen = (size_t)(j->iov_count - at);
    ssize_t n = sendmsg(j->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        j->error = errno;
        return;
      }
      const int64_t left_ms = deadline - now_ms();
      if (left_ms <= 0) return;
      struct pollfd p = {.fd = j->fd, .events = POLLOUT, .revents = 0};
      int r = poll(&p, 1, (int)left_ms);
      if (r < 0 && errno != EINTR) return;
      if (r == 0) return; /* still full: the caller sends the rest */
      continue;
    }
    j->sent += (size_t)n;
    size_t left = (size_t)n;
    while (at < j->iov_count && left >= j->iov[at].iov_len) left -= j->iov[at++].iov_len;
    if (left > 0) {
      j->iov[at].iov_base = (char *)j->iov[at].iov_base + left;
      j->iov[at].iov_len -= left;
    }
  }
}

static void send_complete(napi_env env, napi_status status, void *data) {
  send_job *j = data;
  napi_value cb, global, argv[2];
  napi_get_reference_value(env, j->callback_ref, &cb);
  napi_get_global(env, &global);
  if (status != napi_ok) j->error = j->error ? j->error : EIO;
  if (j->error) napi_create_string_utf8(env, send_errno_name(j->error), NAPI_AUTO_LENGTH, &argv[0]);
  else napi_get_null(env, &argv[0]);
  napi_create_double(env, (double)j->sent, &argv[1]);
  napi_delete_reference(env, j->buffers_ref);
  napi_delete_reference(env, j->callback_ref);
  napi_delete_async_work(env, j->work);
  free(j);
  napi_call_function(env, global, cb, 2, argv, NULL);
}

static napi_value sendv(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  double fd_d, wait_d;
  bool is_array = false;
  napi_valuetype cb_type = napi_undefined;
  uint32_t count = 0;
  if (argc < 4 || napi_get_value_double(env, argv[0], &fd_d) != napi_ok || !(fd_d >= 0 && fd_d < 2147483647.0) ||
      napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array || napi_get_value_double(env, argv[2], &wait_d) != napi_ok ||
      !(wait_d >= 0 && wait_d <= SEND_WAIT_MS_MAX) || napi_typeof(env, argv[3], &cb_type) != napi_ok || cb_type != napi_function ||
      napi_get_array_length(env, argv[1], &count) != napi_ok || count == 0 || count > SEND_BUFFERS_MAX) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "sendv(fd, buffers (1 to 64 Buffers), waitMs (0 to 1000), callback)");
    return NULL;
  }
  send_job *j = calloc(1, sizeof *j);
  if (!j) {
    napi_throw_error(env, "ENOMEM", "sendv: out of memory");
    return NULL;
  }
  j->fd = (int)fd_d;
  j->wait_ms = (int)wait_d;
  for (uint32_t i = 0; i < count; i++) {
    napi_value b;
    bool is_buf = false;
    void *p;
    size_t len;
    if (napi_get_element(env, argv[1], i, &b) != napi_ok || napi_is_buffer(env, b, &is_buf) != napi_ok || !is_buf ||
        napi_get_buffer_info(env, b, &p, &len) != napi_ok) {
      free(j);
      napi_throw_type_error(env, "EINVAL_ARGUMENT", "sendv: every element of buffers must be a Buffer");
      return NULL;
    }
    j->iov[i].iov_base = p;
    j->iov[i].iov_len = len;
  }
  j->iov_count = (int)count;
  napi_value name;
  napi_create_string_utf8(env, "deltavol.sendv", NAPI_AUTO_LENGTH, &name);
  napi_create_reference(env, argv[1], 1, &j->buffers_ref);
  napi_create_reference(env, argv[3], 1, &j->callback_ref);
  if (napi_create_async_work(env, NULL, name, send_execute, send_complete, j, &j->work) != napi_ok ||
      napi_queue_async_work(env, j->work) != napi_ok) {
    napi_delete_reference(env, j->buffers_ref);
    napi_delete_reference(env, j->callback_ref);
    free(j);
    napi_throw_error(env, "EIO", "sendv: could not queue the send");
    return NULL;
  }
  return NULL;
}

/* The one descriptor argument of dupFd / closeFd, or -1 after throwing a TypeError naming `usage`. */
static int fd_arg(napi_env env, napi_callback_info info, const char *usage) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  double fd_d;
  if (argc < 1 || napi_get_value_double(env, argv[0], &fd_d) != napi_ok || !(fd_d >= 0 && fd_d < 2147483647.0)) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", usage);
    return -1;
  }
  return (int)fd_d;
}

/* dupFd(fd) -> a new close-on-exec descriptor for the same socket (F_DUPFD_CLOEXEC). */
static napi_value dup_fd(napi_env env, napi_callback_info info) {
  int fd = fd_arg(env, info, "dupFd(fd)");
  if (fd < 0) return NULL;
  int d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (d < 0) {
    napi_throw_error(env, send_errno_name(errno), "dupFd: fcntl(F_DUPFD_CLOEXEC) failed");
    return NULL;
  }
  napi_value out;
  napi_create_int32(env, d, &out);
  return out;
}

/* closeFd(fd): closes a descriptor dupFd returned. */
static napi_value close_fd(napi_env env, napi_callback_info info) {
  int fd = fd_arg(env, info, "closeFd(fd)");
  if (fd >= 0) close(fd);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"sendv", NULL, sendv, NULL, NULL, NULL, napi_default, NULL},
    {"dupFd", NULL, dup_fd, NULL, NULL, NULL, napi_default, NULL},
    {"closeFd", NULL, close_fd, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
