/*
 * sockx: sends large messages on a socket from the libuv threadpool instead of the event loop.
 * Node writes every socket buffer on its one event loop; on loopback a writev of 1 MiB also
 * runs the receiver's TCP work, and `perf` of 1 MiB reads on four NBD connections put 75% of
 * the loop there (47% of the daemon) while the other core sat half idle.
 *
 * A sender is a queue of messages for one socket, drained by one threadpool job at a time.
 * The loop appends (push) and goes on; the job keeps sending what it finds, so a message
 * queued while another is sent leaves as soon as the socket takes it, without a trip back
 * to the loop (1 MiB reads on one connection, 2026-12-07: one job per send kept the sender
 * busy 86% of the time while its thread used 0.44 cores; the rest was hand-offs and
 * completions waiting for a loop busy with reads). The loop learns what was sent through a
 * coalesced thread-safe call, reads the counters (state) and releases the buffers.
 *
 * sendmsg(2) runs with MSG_DONTWAIT | MSG_NOSIGNAL. When the socket stays full for waitMs
 * (0: not at all; a thread waits at most that long, in poll(2)) or fails, the job stops and
 * the sender refuses pushes until the loop has taken the unsent messages back (resume): the
 * owner sends them through Node's socket, whose bytes must never interleave with ours.
 * The owner passes a dup(2) of the socket (dupFd), so a socket that Node closes meanwhile is
 * never a reused descriptor; close frees the sender once no job runs.
 *
 * A message may end in a range of a file (a large READ reply: its header in buffers, its data
 * where the volume's file holds it): that part goes with sendfile(2), which hands the socket
 * references to the file's cached pages instead of copying them (1 MiB from tmpfs to a
 * loopback reader under CUBIC: 155 us of sender CPU per MiB, against 251-296 us for pread +
 * write). The sender keeps its own dup of the file's descriptor until the message leaves.
 *
 * It also sets and reads a socket's TCP congestion control (TCP_CONGESTION), which Node does
 * not expose: see src/util/tcp-congestion.ts for why deltavol chooses one on loopback.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <assert.h>
#include <fcntl.h>
#include <node_api.h>
#include <poll.h>
#include <pthread.h>
#include <time.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/sendfile.h>
#include <sys/uio.h>
#include <unistd.h>


/* Buffers one message may have: a reply is a header and its data, or a few chunks. */
#define MESSAGE_BUFFERS_MAX 64
/* Buffers one sendmsg call takes (several messages). */
#define SEND_IOV_MAX 128
/* Bytes one sendfile call may send (the job ends between calls: see JOB_BYTES_MAX). */
#define SENDFILE_BYTES_MAX (2u * 1024 * 1024)
/* The longest a send may wait for room in the socket. */
#define SEND_WAIT_MS_MAX 1000
/* A job that has sent this much with more queued ends and queues a new one, so the reads
 * waiting in the threadpool are not held up behind one busy connection. */
#define JOB_BYTES_MAX (8u * 1024 * 1024)

typedef struct {
  struct iovec iov[MESSAGE_BUFFERS_MAX];
  int iov_count;
  size_t iov_bytes;
  /* The file part, after the buffers: the sender's own descriptor (-1: none), where, how long. */
  int file_fd;
  off_t file_off;
  size_t file_len;
  size_t bytes; /* iov_bytes + file_len */
} message;

static void message_close(message *m) {
  if (m->file_fd >= 0) close(m->file_fd);
  m->file_fd = -1;
}

typedef struct {
  pthread_mutex_t mu;
  int fd;
  int wait_ms;
  /* Queued messages are q[head .. head + len); head_sent bytes of q[head] are sent. */
  message *q;
  size_t head, len, cap;
  size_t head_sent;
  double sent_messages; /* since open, monotonic */
  double sendmsg_calls;
  int running; /* a job is queued or running (cleared when its completion runs on the loop) */
  int stopped; /* the socket stayed full, or failed: pushes are refused until resume */
  int error;   /* errno of a failed send, or 0 */
  int closing;
  int notify_pending;
  napi_async_work work;
  napi_threadsafe_function notify;
  napi_ref notify_ref; /* the JS notify function, also called from a job's completion */
} sender;

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

/* Under mu: the queue's first iovecs, past what is sent, into iov. */
static int gather_locked(const sender *s, struct iovec *iov, int *more) {
  int n = 0;
  *more = 0;
  size_t skip = s->head_sent;
  for (size_t m = 0; m < s->len && n < SEND_IOV_MAX; m++) {
    const message *msg = &s->q[s->head + m];
    for (int i = 0; i < msg->iov_count && n < SEND_IOV_MAX; i++) {
      size_t l = msg->iov[i].iov_len;
      if (skip >= l) {
        skip -= l;
        continue;
      }
      iov[n].iov_base = (char *)msg->iov[i].iov_base + skip;
      iov[n].iov_len = l - skip;
      skip = 0;
      n++;
    }
    if (msg->file_fd >= 0) {
      *more = 1; /* its file part follows these bytes */
      break;
    }
  }
  return n;
}

/* Under mu: `n` more bytes left; whole messages leave the queue. */
static void advance_locked(sender *s, size_t n) {
  while (n > 0) {
    assert(s->len > 0);
    const size_t rest = s->q[s->head].bytes - s->head_sent;
    if (n < rest) {
      s->head_sent += n;
      return;
    }
    n -= rest;
    message_close(&s->q[s->head]);
    s->head++;
    s->len--;
    s->head_sent = 0;
    s->sent_messages++;
  }
  /* Zero-length messages behind the last byte sent are sent too. */
  while (s->len > 0 && s->head_sent == 0 && s->q[s->head].bytes == 0) {
    message_close(&s->q[s->head]);
    s->head++;
    s->len--;
    s->sent_messages++;
  }
}

static void drain_execute(napi_env env, void *data) {
  (void)env;
  sender *s = data;
  struct iovec iov[SEND_IOV_MAX];
  size_t job_bytes = 0;
  int64_t full_since = -1;
  int tell = 0; /* the loop is to be told (outside mu), once until it reads the state */
  pthread_mutex_lock(&s->mu);
  while (!s->closing && !s->stopped && s->len > 0 && job_bytes < JOB_BYTES_MAX) {
    const message *head = &s->q[s->head];
    /* The head's buffers are sent and a file part is left: sendfile (copied out under mu:
     * a push may move the queue; the descriptor stays open until the message leaves it). */
    const int file_fd = head->file_fd >= 0 && s->head_sent >= head->iov_bytes ? head->file_fd : -1;
    off_t file_off = 0;
    size_t file_left = 0;
    struct msghdr m;
    int more = 0;
    memset(&m, 0, sizeof m);
    if (file_fd >= 0) {
      file_off = head->file_off + (off_t)(s->head_sent - head->iov_bytes);
      file_left = head->bytes - s->head_sent;
      if (file_left > SENDFILE_BYTES_MAX) file_left = SENDFILE_BYTES_MAX;
    } else {
      m.msg_iov = iov;
      m.msg_iovlen = (size_t)gather_locked(s, iov, &more);
    }
    pthread_mutex_unlock(&s->mu);
    if (tell) napi_call_threadsafe_function(s->notify, NULL, napi_tsfn_nonblocking);
    tell = 0;
    ssize_t n;
    if (file_fd >= 0) {
      /* The socket is non-blocking (libuv's): a full one answers EAGAIN as sendmsg does.
       * Node ignores SIGPIPE, so a peer gone is EPIPE here too. */
      n = sendfile(s->fd, file_fd, &file_off, file_left);
      if (n == 0) {
        n = -1; /* the file ended before the range did: it shrank under us */
        errno = EIO;
      }
    } else {
      n = sendmsg(s->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL | (more ? MSG_MORE : 0));
    }
    int e = n < 0 ? errno : 0;
    if (n < 0 && (e == EAGAIN || e == EWOULDBLOCK)) {
      const int64_t now = now_ms();
      if (full_since < 0) full_since = now;
      const int64_t left_ms = full_since + s->wait_ms - now;
      struct pollfd p = {.fd = s->fd, .events = POLLOUT, .revents = 0};
      if (left_ms > 0 && poll(&p, 1, (int)left_ms) >= 0) e = EINTR; /* try again (the deadline stands) */
    }
    pthread_mutex_lock(&s->mu);
    s->sendmsg_calls++;
    if (n < 0) {
      if (e == EINTR) continue;
      if (e != EAGAIN && e != EWOULDBLOCK) s->error = e;
      s->stopped = 1; /* still full, or failed: the loop takes the rest */
      break;
    }
    full_since = -1;
    job_bytes += (size_t)n;
    advance_locked(s, (size_t)n);
    tell = !s->notify_pending;
    s->notify_pending = 1;
  }
  pthread_mutex_unlock(&s->mu);
  /* No call here: the job's completion tells the loop (and the sender lives until then). */
}

/* Under mu (or once no job runs): the queued messages are forgotten; their descriptors close. */
static void forget_queue_locked(sender *s) {
  for (size_t i = 0; i < s->len; i++) message_close(&s->q[s->head + i]);
  s->head = s->len = s->head_sent = 0;
}

static void sender_free(sender *s) {
  napi_release_threadsafe_function(s->notify, napi_tsfn_release);
  forget_queue_locked(s);
  close(s->fd);
  pthread_mutex_destroy(&s->mu);
  free(s->q);
  free(s);
}

static void start_job(napi_env env, sender *s);

/* On the loop: the job ended. Queues the next one if messages wait, frees a closed sender,
 * and tells JS (notify(true) once the sender is freed: its messages are no longer read). */
static void drain_complete(napi_env env, napi_status status, void *data) {
  sender *s = data;
  napi_value cb, global, arg;
  napi_get_reference_value(env, s->notify_ref, &cb);
  napi_delete_async_work(env, s->work);
  pthread_mutex_lock(&s->mu);
  if (status != napi_ok && !s->stopped) {
    s->error = s->error ? s->error : EIO;
    s->stopped = 1;
  }
  s->running = 0;
  const int closing = s->closing;
  const int again = !closing && !s->stopped && s->len > 0;
  if (again) s->running = 1;
  s->notify_pending = 1; /* this call tells */
  pthread_mutex_unlock(&s->mu);
  if (closing) {
    napi_delete_reference(env, s->notify_ref);
    sender_free(s);
  } else if (again) {
    start_job(env, s);
  }
  napi_get_global(env, &global);
  napi_get_boolean(env, closing, &arg);
  napi_call_function(env, global, cb, 1, &arg, NULL);
}

/* On the loop, with running just set. */
static void start_job(napi_env env, sender *s) {
  napi_value name;
  napi_create_string_utf8(env, "deltavol.send", NAPI_AUTO_LENGTH, &name);
  if (napi_create_async_work(env, NULL, name, drain_execute, drain_complete, s, &s->work) != napi_ok ||
      napi_queue_async_work(env, s->work) != napi_ok) {
    /* Not expected; the messages go back to the loop like a full socket's (told through
     * the notifier: this runs inside senderPush or a completion, not where JS can be called). */
    pthread_mutex_lock(&s->mu);
    s->running = 0;
    s->stopped = 1;
    s->error = EIO;
    s->notify_pending = 1;
    pthread_mutex_unlock(&s->mu);
    napi_call_threadsafe_function(s->notify, NULL, napi_tsfn_nonblocking);
  }
}

static void notify_call_js(napi_env env, napi_value cb, void *context, void *data) {
  (void)context;
  (void)data;
  if (env == NULL || cb == NULL) return;
  napi_value global, arg;
  napi_get_global(env, &global);
  napi_get_boolean(env, false, &arg);
  napi_call_function(env, global, cb, 1, &arg, NULL);
}

static sender *sender_arg(napi_env env, napi_value v) {
  void *p = NULL;
  napi_valuetype t = napi_undefined;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &p) != napi_ok) return NULL;
  return p;
}

/* senderOpen(fd, waitMs, notify) -> handle. notify(closed) runs on the loop when there is
 * news (read it with senderState); closed is true once, after senderClose, when the sender
 * is freed. fd is the sender's from now on (closed with it). */
static napi_value sender_open(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  double fd_d, wait_d;
  napi_valuetype cb_type = napi_undefined;
  if (argc < 3 || napi_get_value_double(env, argv[0], &fd_d) != napi_ok || !(fd_d >= 0 && fd_d < 2147483647.0) ||
      napi_get_value_double(env, argv[1], &wait_d) != napi_ok || !(wait_d >= 0 && wait_d <= SEND_WAIT_MS_MAX) ||
      napi_typeof(env, argv[2], &cb_type) != napi_ok || cb_type != napi_function) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "senderOpen(fd, waitMs (0 to 1000), notify)");
    return NULL;
  }
  sender *s = calloc(1, sizeof *s);
  if (!s) {
    napi_throw_error(env, "ENOMEM", "senderOpen: out of memory");
    return NULL;
  }
  s->fd = (int)fd_d;
  s->wait_ms = (int)wait_d;
  pthread_mutex_init(&s->mu, NULL);
  napi_value name, out;
  napi_create_string_utf8(env, "deltavol.sendNotify", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[2], NULL, name, 0, 1, NULL, NULL, NULL, notify_call_js, &s->notify) != napi_ok) {
    pthread_mutex_destroy(&s->mu);
    free(s);
    napi_throw_error(env, "EIO", "senderOpen: could not create the notifier");
    return NULL;
  }
  napi_unref_threadsafe_function(env, s->notify); /* a sender never keeps the process alive */
  napi_create_reference(env, argv[2], 1, &s->notify_ref);
  napi_create_external(env, s, NULL, NULL, &out);
  return out;
}

/* senderPush(handle, buffers[, fileFd, fileOffset, fileLength]) -> true: queued (sent by a
 * job); false: refused (stopped or closing; the caller reads senderState). The buffers (1 to
 * 64) must not change or be collected until senderState counts the message sent, or the
 * sender is freed. With a file part, fileLength bytes of fileFd from fileOffset follow the
 * buffers; the sender sends them from its own dup of fileFd (the caller's may close). */
static napi_value sender_push(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  sender *s = argc >= 2 ? sender_arg(env, argv[0]) : NULL;
  bool is_array = false;
  uint32_t count = 0;
  if (!s || napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[1], &count) != napi_ok ||
      count == 0 || count > MESSAGE_BUFFERS_MAX) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "senderPush(handle, buffers (1 to 64 Buffers))");
    return NULL;
  }
  message msg;
  msg.iov_count = (int)count;
  msg.iov_bytes = 0;
  msg.file_fd = -1;
  msg.file_off = 0;
  msg.file_len = 0;
  for (uint32_t i = 0; i < count; i++) {
    napi_value b;
    bool is_buf = false;
    void *p;
    size_t len;
    if (napi_get_element(env, argv[1], i, &b) != napi_ok || napi_is_buffer(env, b, &is_buf) != napi_ok || !is_buf ||
        napi_get_buffer_info(env, b, &p, &len) != napi_ok) {
      napi_throw_type_error(env, "EINVAL_ARGUMENT", "senderPush: every element of buffers must be a Buffer");
      return NULL;
    }
    msg.iov[i].iov_base = p;
    msg.iov[i].iov_len = len;
    msg.iov_bytes += len;
  }
  if (argc >= 5) {
    double fd_d, off_d, len_d;
    if (napi_get_value_double(env, argv[2], &fd_d) != napi_ok || !(fd_d >= 0 && fd_d < 2147483647.0) ||
        napi_get_value_double(env, argv[3], &off_d) != napi_ok || !(off_d >= 0 && off_d <= 9007199254740991.0) ||
        napi_get_value_double(env, argv[4], &len_d) != napi_ok || !(len_d >= 1 && len_d <= 1073741824.0) ||
        off_d != (double)(int64_t)off_d || len_d != (double)(int64_t)len_d) {
      napi_throw_type_error(env, "EINVAL_ARGUMENT", "senderPush(handle, buffers, fileFd, fileOffset, fileLength (1 byte to 1 GiB))");
      return NULL;
    }
    msg.file_fd = fcntl((int)fd_d, F_DUPFD_CLOEXEC, 0);
    if (msg.file_fd < 0) {
      napi_throw_error(env, send_errno_name(errno), "senderPush: fcntl(F_DUPFD_CLOEXEC) of the file failed");
      return NULL;
    }
    msg.file_off = (off_t)off_d;
    msg.file_len = (size_t)len_d;
  }
  msg.bytes = msg.iov_bytes + msg.file_len;
  pthread_mutex_lock(&s->mu);
  int ok = !s->stopped && !s->closing;
  if (ok && s->head + s->len == s->cap) {
    if (s->head > 0) {
      memmove(s->q, s->q + s->head, s->len * sizeof *s->q);
      s->head = 0;
    } else {
      const size_t cap = s->cap ? s->cap * 2 : 16;
      message *q = realloc(s->q, cap * sizeof *q);
      if (q) {
        s->q = q;
        s->cap = cap;
      } else {
        ok = 0;
      }
    }
  }
  int start = 0;
  if (ok) {
    s->q[s->head + s->len++] = msg;
    start = !s->running;
    if (start) s->running = 1;
  }
  pthread_mutex_unlock(&s->mu);
  if (!ok) message_close(&msg);
  if (start) start_job(env, s);
  napi_value out;
  napi_get_boolean(env, ok, &out);
  return out;
}

/* senderState(handle, out: Float64Array(5)) -> errno name of a failed send, or null.
 * out = [messages sent since open, sendmsg calls since open, stopped, bytes of the first
 * unsent message already sent, a job queued or running]. */
static napi_value sender_state(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  sender *s = argc >= 2 ? sender_arg(env, argv[0]) : NULL;
  napi_typedarray_type type;
  size_t length = 0;
  void *p = NULL;
  if (!s || napi_get_typedarray_info(env, argv[1], &type, &length, &p, NULL, NULL) != napi_ok || type != napi_float64_array || length < 5) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "senderState(handle, Float64Array(5))");
    return NULL;
  }
  double *out = p;
  pthread_mutex_lock(&s->mu);
  out[0] = s->sent_messages;
  out[1] = s->sendmsg_calls;
  out[2] = s->stopped;
  out[3] = (double)s->head_sent;
  out[4] = s->running;
  const int error = s->error;
  s->notify_pending = 0;
  pthread_mutex_unlock(&s->mu);
  napi_value r;
  if (error) napi_create_string_utf8(env, send_errno_name(error), NAPI_AUTO_LENGTH, &r);
  else napi_get_null(env, &r);
  return r;
}

/* The one handle argument of senderResume / senderClose, or NULL after a TypeError naming `usage`. */
static sender *handle_only_arg(napi_env env, napi_callback_info info, const char *usage) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  sender *s = argc >= 1 ? sender_arg(env, argv[0]) : NULL;
  if (!s) napi_throw_type_error(env, "EINVAL_ARGUMENT", usage);
  return s;
}

/* senderResume(handle): after a stop, once no job runs: forgets the unsent messages (the
 * caller took them back) and takes pushes again. */
static napi_value sender_resume(napi_env env, napi_callback_info info) {
  sender *s = handle_only_arg(env, info, "senderResume(handle)");
  if (!s) return NULL;
  pthread_mutex_lock(&s->mu);
  const int ok = s->stopped && !s->running;
  if (ok) {
    forget_queue_locked(s);
    s->stopped = 0;
    s->error = 0;
  }
  pthread_mutex_unlock(&s->mu);
  if (!ok) napi_throw_error(env, "EINVAL_STATE", "senderResume: only a stopped sender with no job running resumes");
  return NULL;
}

/* senderClose(handle) -> true: freed now; false: freed when its job ends (notify(true)).
 * The handle is not used again either way. */
static napi_value sender_close(napi_env env, napi_callback_info info) {
  sender *s = handle_only_arg(env, info, "senderClose(handle)");
  if (!s) return NULL;
  pthread_mutex_lock(&s->mu);
  s->closing = 1;
  const int running = s->running;
  pthread_mutex_unlock(&s->mu);
  if (!running) {
    napi_delete_reference(env, s->notify_ref);
    sender_free(s);
  }
  napi_value out;
  napi_get_boolean(env, !running, &out);
  return out;
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

/* The algorithm name out of TCP_CONGESTION on fd into buf (at least TCP_CA_NAME_MAX + 1 bytes); 0 or an errno. */
static int congestion_of(int fd, char *buf, socklen_t size) {
  socklen_t len = size - 1;
  if (getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, buf, &len) != 0) return errno;
  buf[len < size ? len : size - 1] = 0;
  return 0;
}

static const char *congestion_errno_name(int e) {
  switch (e) {
  case ENOENT: return "ENOENT";   /* no such algorithm (not built, module not loadable) */
  case EPERM: return "EPERM";     /* not in net.ipv4.tcp_allowed_congestion_control */
  case EBUSY: return "EBUSY";
  case ENOPROTOOPT: return "ENOPROTOOPT";
  case EINVAL: return "EINVAL";
  default: return send_errno_name(e);
  }
}

/* congestion(fd[, name]) -> the socket's congestion control after setting it to name, if given. */
static napi_value congestion(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  double fd_d;
  if (argc < 1 || napi_get_value_double(env, argv[0], &fd_d) != napi_ok || !(fd_d >= 0 && fd_d < 2147483647.0)) {
    napi_throw_type_error(env, "EINVAL_ARGUMENT", "congestion(fd[, name])");
    return NULL;
  }
  int fd = (int)fd_d;
  char name[64];
  if (argc >= 2) {
    napi_valuetype t;
    napi_typeof(env, argv[1], &t);
    size_t len = 0;
    if (t != napi_string || napi_get_value_string_utf8(env, argv[1], name, sizeof name, &len) != napi_ok || len == 0 || len >= 16) {
      napi_throw_type_error(env, "EINVAL_ARGUMENT", "congestion(fd, name): name is 1 to 15 characters");
      return NULL;
    }
    if (setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name, (socklen_t)len) != 0) {
      int e = errno;
      napi_throw_error(env, congestion_errno_name(e), "setsockopt(TCP_CONGESTION) failed");
      return NULL;
    }
  }
  int e = congestion_of(fd, name, sizeof name);
  if (e != 0) {
    napi_throw_error(env, congestion_errno_name(e), "getsockopt(TCP_CONGESTION) failed");
    return NULL;
  }
  napi_value out;
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &out);
  return out;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"senderOpen", NULL, sender_open, NULL, NULL, NULL, napi_default, NULL},
    {"senderPush", NULL, sender_push, NULL, NULL, NULL, napi_default, NULL},
    {"senderState", NULL, sender_state, NULL, NULL, NULL, napi_default, NULL},
    {"senderResume", NULL, sender_resume, NULL, NULL, NULL, napi_default, NULL},
    {"senderClose", NULL, sender_close, NULL, NULL, NULL, napi_default, NULL},
    {"dupFd", NULL, dup_fd, NULL, NULL, NULL, napi_default, NULL},
    {"closeFd", NULL, close_fd, NULL, NULL, NULL, napi_default, NULL},
    {"congestion", NULL, congestion, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
