/* A gRPC server transport: HTTP/2 (RFC 9113) over plaintext TCP, run by one epoll thread.
 *
 * The loop thread accepts connections, reads and parses frames, decodes header blocks (kp_hpack.h),
 * reassembles gRPC length-prefixed messages and hands complete work to Python through two queues:
 *   - calls:  a unary-request call, complete (method, metadata, deadline, the one request message);
 *             taken by the N worker threads (kp_h2_next(..., KP_H2_Q_CALLS)).
 *   - events: the start of a client-streaming call, each of its messages, its half-close, and the
 *             cancellation of any call handed over and not yet answered (peer reset, deadline, connection
 *             lost); taken by one dispatcher thread, in order.
 * Responses are written by whichever thread calls kp_h2_respond / kp_h2_send, under the connection's
 * lock, straight to the socket while the peer's flow-control windows allow, else kept on the stream and
 * sent by the loop when WINDOW_UPDATE or the socket's writability lets it.
 *
 * Everything the peer sends is bounded: frame size (our SETTINGS_MAX_FRAME_SIZE), header block size,
 * decoded header list size, message size, streams per connection, connections. A peer that breaks the
 * protocol gets GOAWAY and the connection closes; a stream that breaks a bound gets a gRPC status and
 * RST_STREAM. Nothing the peer sends can end the loop.
 *
 * Locking: a connection's state (streams, windows, output buffer) is under its mutex; the queues are
 * under the server's qmu. Order: connection, then queue; never the reverse. Connection slots are never
 * freed while the server lives, so a call id (slot, generation, stream id) can always be checked safely.
 */
#ifndef KP_H2_H
#define KP_H2_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "kp_hpack.h"
#include "kp_lane.h" /* kp_doorbell: the admission check below reads a model's queue counters */

/* frame types */
enum { KP_F_DATA = 0, KP_F_HEADERS = 1, KP_F_PRIORITY = 2, KP_F_RST = 3, KP_F_SETTINGS = 4, KP_F_PUSH = 5,
       KP_F_PING = 6, KP_F_GOAWAY = 7, KP_F_WINDOW = 8, KP_F_CONT = 9 };
/* flags */
#define KP_FL_END_STREAM 0x1
#define KP_FL_ACK 0x1
#define KP_FL_END_HEADERS 0x4
#define KP_FL_PADDED 0x8
#define KP_FL_PRIORITY 0x20
/* error codes */
enum { KP_E_NO_ERROR = 0, KP_E_PROTOCOL = 1, KP_E_INTERNAL = 2, KP_E_FLOW = 3, KP_E_STREAM_CLOSED = 5,
       KP_E_FRAME_SIZE = 6, KP_E_REFUSED = 7, KP_E_CANCEL = 8, KP_E_COMPRESSION = 9, KP_E_CALM = 11 };
/* gRPC status codes used by the transport itself */
enum { KP_G_OK = 0, KP_G_CANCELLED = 1, KP_G_UNKNOWN = 2, KP_G_DEADLINE = 4, KP_G_RESOURCE = 8,
       KP_G_UNIMPLEMENTED = 12, KP_G_INTERNAL = 13, KP_G_UNAVAILABLE = 14 };

/* queue item kinds */
enum { KP_H2_CALL = 1, KP_H2_START = 2, KP_H2_MSG = 3, KP_H2_HALF_CLOSE = 4, KP_H2_CANCEL = 5 };
enum { KP_H2_Q_CALLS = 0, KP_H2_Q_EVENTS = 1 };
/* request message encodings (grpc-encoding); the transport only frames them, Python inflates */
enum { KP_H2_ENC_IDENTITY = 0, KP_H2_ENC_GZIP = 1, KP_H2_ENC_DEFLATE = 2, KP_H2_ENC_OTHER = -1 };

/* limits and what we advertise */
#define KP_H2_MAX_FRAME (1u << 20)            /* SETTINGS_MAX_FRAME_SIZE we accept */
#define KP_H2_STREAM_WINDOW (8u << 20)        /* SETTINGS_INITIAL_WINDOW_SIZE we advertise */
#define KP_H2_CONN_WINDOW (64u << 20)         /* our connection window after the first WINDOW_UPDATE */
#define KP_H2_MAX_HEADER_BLOCK (256u << 10)   /* coded header block bytes (HEADERS + CONTINUATION) */
#define KP_H2_OUT_HIGH (4u << 20)             /* stop framing response DATA above this much unsent */
#define KP_H2_DEFAULT_WINDOW 65535u
#define KP_H2_PREFACE_TIMEOUT 10.0           /* seconds to send the connection preface and SETTINGS */

#define KP_H2_ADMIT_MAX 256  /* models the admission check knows */
#define KP_H2_ADMIT_NAME 256 /* bytes of a model name it compares (longer names are not checked) */

typedef struct kp_h2_item {
    struct kp_h2_item *next;
    int kind;
    int method;      /* index in the method table; -1 unknown */
    uint64_t call_id;
    double deadline; /* CLOCK_MONOTONIC seconds; 0: none */
    char *meta;      /* [u32 nlen][u32 vlen][name][value]... */
    uint32_t meta_len;
    uint8_t *data;   /* the message (CALL, MSG), malloc'd */
    uint32_t len;
    int compressed;  /* the message is compressed with the call's grpc-encoding (KP_H2_ENC_*) */
} kp_h2_item;

typedef struct kp_h2_stream {
    struct kp_h2_stream *next;
    uint32_t id;
    int method;
    int client_streaming;
    int remote_closed;  /* END_STREAM received */
    int local_closed;   /* trailers (END_STREAM) queued */
    int dispatched;     /* Python knows the call */
    int answered;       /* Python gave its status (kp_h2_respond) */
    int failed;         /* the transport answered with an error; ignore further DATA */
    int encoding;       /* KP_H2_ENC_* of the request's grpc-encoding */
    int msg_compressed; /* the message being assembled has the compressed flag */
    int umsg_compressed;
    int headers_sent;
    int64_t send_window;
    int64_t recv_window;
    uint32_t recv_unacked;
    double deadline;
    char *meta;
    uint32_t meta_len;
    /* message reassembly */
    uint8_t pfx[5];
    uint32_t pfx_have;
    uint8_t *msg;
    uint32_t msg_len, msg_have;
    int nmsgs;
    uint8_t *umsg; /* unary: the request message */
    uint32_t umsg_len;
    /* response output waiting for window */
    uint8_t *pend;
    size_t pend_len, pend_off, pend_cap;
    uint8_t *trailers;
    size_t tlen;
} kp_h2_stream;

typedef struct kp_h2_conn {
    pthread_mutex_t mu;
    uint32_t gen;
    int fd;
    int open;
    double accepted_at; /* a connection that has not sent its preface within KP_H2_PREFACE_TIMEOUT closes */
    char peer[64];
    /* input (loop thread only) */
    uint8_t *rbuf;
    size_t rlen, rcap;
    int preface_ok, settings_seen;
    /* output (under mu) */
    uint8_t *obuf;
    size_t olen, ooff, ocap;
    int out_armed;
    int broken;
    /* header block being assembled */
    uint8_t *hblock;
    size_t hlen, hcap;
    uint32_t hstream;
    uint8_t hflags;
    int in_headers;
    kp_hpack_table dyn;
    /* flow control and settings */
    int64_t send_window;
    int64_t recv_window;
    uint32_t recv_unacked;
    uint32_t peer_initial_window;
    uint32_t peer_max_frame;
    uint32_t last_stream_id;
    int nstreams;
    int goaway_sent;
    kp_h2_stream *streams;
} kp_h2_conn;

typedef struct {
    /* configuration */
    char **paths;
    uint32_t *path_lens;
    uint8_t *streaming;
    int nmethods;
    uint64_t max_msg;
    uint32_t max_header_list;
    uint32_t max_streams;
    int max_conns;
    /* runtime */
    int lfd, epfd, evfd;
    int port;
    pthread_t thread;
    int started;
    volatile int stop_flag;
    volatile int shutdown_flag;
    int shut;
    kp_h2_conn *conns;
    double next_scan;
    /* queues */
    pthread_mutex_t qmu;
    pthread_cond_t qcv[2];
    kp_h2_item *qhead[2], *qtail[2];
    int qclosed;
    uint64_t calls_total, cancels_total, conns_total, protocol_errors;
    /* admission: ModelInfer of a model whose queue is full is refused here, without a Python thread */
    pthread_mutex_t admu;
    int infer_method; /* the method index of ModelInfer; -1: no admission check */
    int nadmit;
    struct {
        char name[KP_H2_ADMIT_NAME];
        uint32_t nlen;
        kp_doorbell *db; /* kept mapped by the Python side while it is in this table */
    } admit[KP_H2_ADMIT_MAX];
    uint64_t rejected_total;
} kp_h2_server;

/* ---------------------------------------------------------------------------------------------------- */
/* small helpers */

static double kp_h2_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint32_t kp_h2_u32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t kp_h2_call_id(int slot, uint32_t gen, uint32_t sid) {
    return ((uint64_t)(uint32_t)slot << 48) | ((uint64_t)(gen & 0xffffu) << 32) | sid;
}

static void kp_h2_push(kp_h2_server *s, int q, kp_h2_item *it) {
    it->next = NULL;
    pthread_mutex_lock(&s->qmu);
    if (s->qclosed) {
        pthread_mutex_unlock(&s->qmu);
        free(it->meta);
        free(it->data);
        free(it);
        return;
    }
    if (s->qtail[q])
        s->qtail[q]->next = it;
    else
        s->qhead[q] = it;
    s->qtail[q] = it;
    pthread_cond_signal(&s->qcv[q]);
    pthread_mutex_unlock(&s->qmu);
}

static kp_h2_item *kp_h2_item_new(int kind, uint64_t call_id) {
    kp_h2_item *it = (kp_h2_item *)calloc(1, sizeof(kp_h2_item));
    if (it) {
        it->kind = kind;
        it->call_id = call_id;
        it->method = -1;
    }
    return it;
}

/* The head of queue q, unlinked, or NULL; the caller holds qmu. */
static kp_h2_item *kp_h2_pop_locked(kp_h2_server *s, int q) {
    kp_h2_item *it = s->qhead[q];
    if (it) {
        s->qhead[q] = it->next;
        if (!s->qhead[q]) s->qtail[q] = NULL;
    }
    return it;
}

/* Blocks until an item is queued or the server is closed (NULL). */
static kp_h2_item *kp_h2_next(kp_h2_server *s, int q) {
    pthread_mutex_lock(&s->qmu);
    while (!s->qhead[q] && !s->qclosed) pthread_cond_wait(&s->qcv[q], &s->qmu);
    kp_h2_item *it = kp_h2_pop_locked(s, q);
    pthread_mutex_unlock(&s->qmu);
    return it;
}

/* The next item if one is queued, else NULL at once (lets a caller holding the GIL skip releasing it). */
static kp_h2_item *kp_h2_try_next(kp_h2_server *s, int q) {
    pthread_mutex_lock(&s->qmu);
    kp_h2_item *it = kp_h2_pop_locked(s, q);
    pthread_mutex_unlock(&s->qmu);
    return it;
}

static void kp_h2_item_free(kp_h2_item *it) {
    if (!it) return;
    free(it->meta);
    free(it->data);
    free(it);
}

/* ---------------------------------------------------------------------------------------------------- */
/* output (caller holds c->mu) */

static int kp_h2_out_reserve(kp_h2_conn *c, size_t n) {
    if (c->ooff && c->ooff == c->olen) c->ooff = c->olen = 0;
    if (c->olen + n <= c->ocap) return 0;
    if (c->ooff) { /* compact first */
        memmove(c->obuf, c->obuf + c->ooff, c->olen - c->ooff);
        c->olen -= c->ooff;
        c->ooff = 0;
        if (c->olen + n <= c->ocap) return 0;
    }
    size_t cap = c->ocap ? c->ocap : 16384;
    while (cap < c->olen + n) cap *= 2;
    uint8_t *b = (uint8_t *)realloc(c->obuf, cap);
    if (!b) return -1;
    c->obuf = b;
    c->ocap = cap;
    return 0;
}

static uint8_t *kp_h2_out_frame(kp_h2_conn *c, uint32_t len, uint8_t type, uint8_t flags, uint32_t sid) {
    if (kp_h2_out_reserve(c, 9 + (size_t)len) < 0) return NULL;
    uint8_t *p = c->obuf + c->olen;
    p[0] = (uint8_t)(len >> 16);
    p[1] = (uint8_t)(len >> 8);
    p[2] = (uint8_t)len;
    p[3] = type;
    p[4] = flags;
    p[5] = (uint8_t)((sid >> 24) & 0x7f);
    p[6] = (uint8_t)(sid >> 16);
    p[7] = (uint8_t)(sid >> 8);
    p[8] = (uint8_t)sid;
    c->olen += 9 + (size_t)len;
    return p + 9;
}

static void kp_h2_out_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void kp_h2_out_rst(kp_h2_conn *c, uint32_t sid, uint32_t code) {
    uint8_t *p = kp_h2_out_frame(c, 4, KP_F_RST, 0, sid);
    if (p) kp_h2_out_u32(p, code);
}

static void kp_h2_out_window(kp_h2_conn *c, uint32_t sid, uint32_t inc) {
    uint8_t *p = kp_h2_out_frame(c, 4, KP_F_WINDOW, 0, sid);
    if (p) kp_h2_out_u32(p, inc);
}

static void kp_h2_out_goaway(kp_h2_conn *c, uint32_t code) {
    uint8_t *p = kp_h2_out_frame(c, 8, KP_F_GOAWAY, 0, 0);
    if (p) {
        kp_h2_out_u32(p, c->last_stream_id);
        kp_h2_out_u32(p + 4, code);
    }
    c->goaway_sent = 1;
}

/* A header block as HEADERS + CONTINUATION frames no larger than the peer's maximum frame size. */
static void kp_h2_out_headers(kp_h2_conn *c, uint32_t sid, const uint8_t *block, size_t len, int end_stream) {
    size_t off = 0;
    int first = 1;
    do {
        size_t n = len - off;
        if (n > c->peer_max_frame) n = c->peer_max_frame;
        uint8_t flags = (uint8_t)((first && end_stream) ? KP_FL_END_STREAM : 0);
        if (off + n == len) flags |= KP_FL_END_HEADERS;
        uint8_t *p = kp_h2_out_frame(c, (uint32_t)n, first ? KP_F_HEADERS : KP_F_CONT, flags, sid);
        if (!p) return;
        memcpy(p, block + off, n);
        off += n;
        first = 0;
    } while (off < len);
}

static void kp_h2_arm(kp_h2_server *s, kp_h2_conn *c, int out) {
    if (c->out_armed == out || c->fd < 0) return;
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLRDHUP | (out ? EPOLLOUT : 0);
    ev.data.u64 = (uint64_t)(c - s->conns);
    if (epoll_ctl(s->epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0) c->out_armed = out;
}

/* Write what is buffered; what the socket does not take waits for EPOLLOUT. */
static void kp_h2_flush(kp_h2_server *s, kp_h2_conn *c) {
    while (c->ooff < c->olen && !c->broken) {
        ssize_t n = send(c->fd, c->obuf + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->ooff += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            kp_h2_arm(s, c, 1);
            return;
        } else {
            c->broken = 1; /* the loop sees the socket's error or hang-up and closes it */
            c->ooff = c->olen = 0;
            return;
        }
    }
    if (c->ooff == c->olen) {
        c->ooff = c->olen = 0;
        if (c->out_armed) kp_h2_arm(s, c, 0);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* streams (caller holds c->mu) */

static kp_h2_stream *kp_h2_find(kp_h2_conn *c, uint32_t sid) {
    for (kp_h2_stream *st = c->streams; st; st = st->next)
        if (st->id == sid) return st;
    return NULL;
}

static void kp_h2_stream_free(kp_h2_stream *st) {
    free(st->meta);
    free(st->msg);
    free(st->umsg);
    free(st->pend);
    free(st->trailers);
    free(st);
}

/* Remove a stream; a call Python holds and has not answered is cancelled (its callbacks run). */
static void kp_h2_stream_end(kp_h2_server *s, kp_h2_conn *c, kp_h2_stream *st) {
    kp_h2_stream **pp = &c->streams;
    while (*pp && *pp != st) pp = &(*pp)->next;
    if (*pp) *pp = st->next;
    c->nstreams--;
    if (st->dispatched && !st->answered) {
        kp_h2_item *it = kp_h2_item_new(KP_H2_CANCEL, kp_h2_call_id((int)(c - s->conns), c->gen, st->id));
        if (it) kp_h2_push(s, KP_H2_Q_EVENTS, it);
        s->cancels_total++;
    }
    kp_h2_stream_free(st);
}

/* Frame pending DATA while both windows and the output high-water mark allow, then the trailers.
 * Returns 1 when the stream has sent everything it will (trailers out). */
static int kp_h2_pump(kp_h2_conn *c, kp_h2_stream *st) {
    while (st->pend_off < st->pend_len) {
        if (c->olen - c->ooff > KP_H2_OUT_HIGH) return 0;
        int64_t w = c->send_window < st->send_window ? c->send_window : st->send_window;
        if (w <= 0) return 0;
        size_t n = st->pend_len - st->pend_off;
        if ((int64_t)n > w) n = (size_t)w;
        if (n > c->peer_max_frame) n = c->peer_max_frame;
        uint8_t *p = kp_h2_out_frame(c, (uint32_t)n, KP_F_DATA, 0, st->id);
        if (!p) return 0;
        memcpy(p, st->pend + st->pend_off, n);
        st->pend_off += n;
        c->send_window -= (int64_t)n;
        st->send_window -= (int64_t)n;
    }
    if (st->pend) {
        free(st->pend);
        st->pend = NULL;
        st->pend_len = st->pend_off = st->pend_cap = 0;
    }
    if (st->trailers) {
        kp_h2_out_headers(c, st->id, st->trailers, st->tlen, 1);
        free(st->trailers);
        st->trailers = NULL;
        st->local_closed = 1;
        return 1;
    }
    return st->local_closed;
}

/* After the trailers: a peer still sending is told to stop (RST_STREAM NO_ERROR), then the stream goes. */
static void kp_h2_finish_stream(kp_h2_server *s, kp_h2_conn *c, kp_h2_stream *st) {
    if (!st->remote_closed) kp_h2_out_rst(c, st->id, KP_E_NO_ERROR);
    kp_h2_stream_end(s, c, st);
}

static void kp_h2_pump_all(kp_h2_server *s, kp_h2_conn *c) {
    kp_h2_stream *st = c->streams;
    while (st) {
        kp_h2_stream *next = st->next;
        if ((st->pend || st->trailers) && kp_h2_pump(c, st)) kp_h2_finish_stream(s, c, st);
        st = next;
    }
}

/* Flush, and while the socket takes everything, frame more of the streams that wait (pump_all stops
 * framing at the output high-water mark; without this a response could wait for an EPOLLOUT that never
 * comes, the socket having taken all that was framed). */
static void kp_h2_flush_pump(kp_h2_server *s, kp_h2_conn *c) {
    for (;;) {
        kp_h2_flush(s, c);
        if (c->broken || c->olen > c->ooff) return; /* blocked: EPOLLOUT is armed */
        size_t before = c->olen;
        kp_h2_pump_all(s, c);
        if (c->olen == before) return;
    }
}

static const uint8_t kp_h2_resp_headers[] = {
    0x88, /* :status 200 (static index 8) */
    0x0f, 0x10, 16, 'a', 'p', 'p', 'l', 'i', 'c', 'a', 't', 'i', 'o', 'n', '/', 'g', 'r', 'p', 'c',
    /* content-type (static name 31): application/grpc */
};

/* grpc-status and grpc-message (percent-encoded, gRPC over HTTP/2) appended to a header block. */
static uint8_t *kp_h2_status_block(int with_response_headers, int status, const char *msg, size_t mlen,
                                   size_t *out_len) {
    if (mlen > 4096) mlen = 4096;
    size_t cap = sizeof(kp_h2_resp_headers) + 64 + mlen * 3 + 32;
    uint8_t *b = (uint8_t *)malloc(cap);
    if (!b) return NULL;
    size_t n = 0;
    if (with_response_headers) {
        memcpy(b, kp_h2_resp_headers, sizeof(kp_h2_resp_headers));
        n = sizeof(kp_h2_resp_headers);
    }
    char st[16];
    int sl = snprintf(st, sizeof(st), "%d", status);
    n += kp_hpack_put_literal(b + n, "grpc-status", 11, st, (size_t)sl);
    if (mlen) {
        char *enc = (char *)malloc(mlen * 3 + 1);
        if (enc) {
            size_t e = 0;
            for (size_t i = 0; i < mlen; i++) {
                unsigned char ch = (unsigned char)msg[i];
                if (ch < 0x20 || ch > 0x7e || ch == '%') {
                    static const char hex[] = "0123456789ABCDEF";
                    enc[e++] = '%';
                    enc[e++] = hex[ch >> 4];
                    enc[e++] = hex[ch & 15];
                } else {
                    enc[e++] = (char)ch;
                }
            }
            n += kp_hpack_put_literal(b + n, "grpc-message", 12, enc, e);
            free(enc);
        }
    }
    *out_len = n;
    return b;
}

/* Queue response headers (once), an optional message and optional trailers on a stream, and pump.
 * Returns 1 when the stream is finished. */
static int kp_h2_stream_write(kp_h2_conn *c, kp_h2_stream *st, const uint8_t *data, size_t len, int has_data,
                              int has_status, int status, const char *msg, size_t mlen) {
    if (has_status && !st->headers_sent && !has_data && !st->pend && !st->trailers) {
        /* Trailers-Only: one HEADERS frame with the status */
        size_t bl;
        uint8_t *b = kp_h2_status_block(1, status, msg, mlen, &bl);
        if (!b) return 0;
        st->headers_sent = 1;
        kp_h2_out_headers(c, st->id, b, bl, 1);
        free(b);
        st->local_closed = 1;
        return 1;
    }
    if (!st->headers_sent) {
        st->headers_sent = 1;
        kp_h2_out_headers(c, st->id, kp_h2_resp_headers, sizeof(kp_h2_resp_headers), 0);
    }
    if (has_data) {
        size_t need = st->pend_len - st->pend_off + 5 + len;
        if (st->pend_off && st->pend_off == st->pend_len) st->pend_off = st->pend_len = 0;
        if (st->pend_len + 5 + len > st->pend_cap) {
            if (st->pend_off) {
                memmove(st->pend, st->pend + st->pend_off, st->pend_len - st->pend_off);
                st->pend_len -= st->pend_off;
                st->pend_off = 0;
            }
            if (st->pend_len + 5 + len > st->pend_cap) {
                uint8_t *p = (uint8_t *)realloc(st->pend, need);
                if (!p) return 0;
                st->pend = p;
                st->pend_cap = need;
            }
        }
        uint8_t *p = st->pend + st->pend_len;
        p[0] = 0;
        kp_h2_out_u32(p + 1, (uint32_t)len);
        if (len) memcpy(p + 5, data, len);
        st->pend_len += 5 + len;
    }
    if (has_status) {
        size_t bl;
        st->trailers = kp_h2_status_block(0, status, msg, mlen, &bl);
        st->tlen = bl;
    }
    return kp_h2_pump(c, st);
}

/* The transport answers a call itself (bad request, bounds, deadline). */
static void kp_h2_fail_stream(kp_h2_server *s, kp_h2_conn *c, kp_h2_stream *st, int status, const char *msg) {
    st->failed = 1;
    free(st->pend);
    st->pend = NULL;
    st->pend_len = st->pend_off = st->pend_cap = 0;
    free(st->trailers);
    st->trailers = NULL;
    if (!st->local_closed) {
        if (st->headers_sent) {
            size_t bl;
            uint8_t *b = kp_h2_status_block(0, status, msg, strlen(msg), &bl);
            if (b) {
                kp_h2_out_headers(c, st->id, b, bl, 1);
                free(b);
            }
            st->local_closed = 1;
        } else {
            kp_h2_stream_write(c, st, NULL, 0, 0, 1, status, msg, strlen(msg));
        }
    }
    kp_h2_finish_stream(s, c, st);
}

/* ---------------------------------------------------------------------------------------------------- */
/* connections */

static int kp_h2_conn_slot(kp_h2_server *s, kp_h2_conn *c) { return (int)(c - s->conns); }

/* Loop thread only. Every unanswered call Python holds is cancelled. */
static void kp_h2_conn_close(kp_h2_server *s, kp_h2_conn *c) {
    pthread_mutex_lock(&c->mu);
    if (!c->open) {
        pthread_mutex_unlock(&c->mu);
        return;
    }
    while (c->streams) kp_h2_stream_end(s, c, c->streams);
    epoll_ctl(s->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->open = 0;
    c->gen++;
    free(c->rbuf);
    free(c->obuf);
    free(c->hblock);
    c->rbuf = c->obuf = c->hblock = NULL;
    c->rlen = c->rcap = c->olen = c->ooff = c->ocap = c->hlen = c->hcap = 0;
    kp_hpack_table_free(&c->dyn);
    pthread_mutex_unlock(&c->mu);
}

/* A connection error (RFC 9113 5.4.1): GOAWAY with the code, then the connection closes. Caller holds
 * c->mu; the loop closes the connection when it sees `broken`. */
static void kp_h2_conn_error(kp_h2_server *s, kp_h2_conn *c, uint32_t code) {
    s->protocol_errors++;
    if (!c->goaway_sent) kp_h2_out_goaway(c, code);
    kp_h2_flush(s, c);
    shutdown(c->fd, SHUT_WR);
    c->broken = 1;
}

static void kp_h2_accept(kp_h2_server *s) {
    for (;;) {
        struct sockaddr_storage addr;
        socklen_t alen = sizeof(addr);
        int fd = accept4(s->lfd, (struct sockaddr *)&addr, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        int slot = -1;
        for (int i = 0; i < s->max_conns; i++)
            if (!s->conns[i].open) {
                slot = i;
                break;
            }
        if (slot < 0) { /* too many connections: refuse this one */
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        kp_h2_conn *c = &s->conns[slot];
        pthread_mutex_lock(&c->mu);
        c->fd = fd;
        c->open = 1;
        c->accepted_at = kp_h2_now();
        if (c->accepted_at + KP_H2_PREFACE_TIMEOUT < s->next_scan) s->next_scan = c->accepted_at + KP_H2_PREFACE_TIMEOUT;
        c->preface_ok = c->settings_seen = 0;
        c->out_armed = 0;
        c->broken = 0;
        c->in_headers = 0;
        c->send_window = KP_H2_DEFAULT_WINDOW;
        c->recv_window = KP_H2_CONN_WINDOW;
        c->recv_unacked = 0;
        c->peer_initial_window = KP_H2_DEFAULT_WINDOW;
        c->peer_max_frame = 16384;
        c->last_stream_id = 0;
        c->nstreams = 0;
        c->goaway_sent = 0;
        c->streams = NULL;
        kp_hpack_table_init(&c->dyn);
        c->peer[0] = 0;
        char host[INET6_ADDRSTRLEN] = "";
        if (addr.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&addr;
            inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
            snprintf(c->peer, sizeof(c->peer), "ipv4:%s:%u", host, ntohs(a->sin_port));
        } else if (addr.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&addr;
            inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
            snprintf(c->peer, sizeof(c->peer), "ipv6:[%s]:%u", host, ntohs(a->sin6_port));
        }
        /* our SETTINGS and the connection window, sent at once (the server preface) */
        uint8_t *p = kp_h2_out_frame(c, 24, KP_F_SETTINGS, 0, 0);
        if (p) {
            const uint16_t ids[4] = {0x2 /* ENABLE_PUSH */, 0x3 /* MAX_CONCURRENT_STREAMS */,
                                     0x4 /* INITIAL_WINDOW_SIZE */, 0x5 /* MAX_FRAME_SIZE */};
            const uint32_t vals[4] = {0, s->max_streams, KP_H2_STREAM_WINDOW, KP_H2_MAX_FRAME};
            for (int i = 0; i < 4; i++) {
                p[i * 6] = (uint8_t)(ids[i] >> 8);
                p[i * 6 + 1] = (uint8_t)ids[i];
                kp_h2_out_u32(p + i * 6 + 2, vals[i]);
            }
        }
        kp_h2_out_window(c, 0, KP_H2_CONN_WINDOW - KP_H2_DEFAULT_WINDOW);
        struct epoll_event ev;
        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN | EPOLLRDHUP;
        ev.data.u64 = (uint64_t)slot;
        epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev);
        s->conns_total++;
        kp_h2_flush(s, c);
        pthread_mutex_unlock(&c->mu);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* request headers */

typedef struct {
    kp_h2_server *s;
    char *meta;
    size_t mlen, mcap;
    uint64_t list_size;
    int too_big;
    int regular_seen;   /* a regular field came: later pseudo-fields are malformed */
    int malformed;
    char path[512];
    int path_len;       /* -1: too long */
    int method_post;
    int content_grpc;
    int have_path;
    double timeout;     /* seconds; < 0 none */
    int encoding;       /* KP_H2_ENC_* */
} kp_h2_hdrs;

static int kp_h2_meta_add(kp_h2_hdrs *h, const char *name, uint32_t nlen, const char *value, uint32_t vlen) {
    size_t need = 8 + (size_t)nlen + vlen;
    if (h->mlen + need > h->mcap) {
        size_t cap = h->mcap ? h->mcap * 2 : 512;
        while (cap < h->mlen + need) cap *= 2;
        char *m = (char *)realloc(h->meta, cap);
        if (!m) return -1;
        h->meta = m;
        h->mcap = cap;
    }
    char *p = h->meta + h->mlen;
    memcpy(p, &nlen, 4);
    memcpy(p + 4, &vlen, 4);
    memcpy(p + 8, name, nlen);
    memcpy(p + 8 + nlen, value, vlen);
    h->mlen += need;
    return 0;
}

static int kp_h2_eq(const char *a, uint32_t alen, const char *lit) {
    size_t n = strlen(lit);
    return alen == n && memcmp(a, lit, n) == 0;
}

/* grpc-timeout: at most 8 digits and a unit (H M S m u n). */
static double kp_h2_parse_timeout(const char *v, uint32_t n) {
    if (n < 2 || n > 9) return -1;
    double x = 0;
    for (uint32_t i = 0; i + 1 < n; i++) {
        if (v[i] < '0' || v[i] > '9') return -1;
        x = x * 10 + (v[i] - '0');
    }
    switch (v[n - 1]) {
    case 'H': return x * 3600;
    case 'M': return x * 60;
    case 'S': return x;
    case 'm': return x * 1e-3;
    case 'u': return x * 1e-6;
    case 'n': return x * 1e-9;
    default: return -1;
    }
}

static int kp_h2_header_sink(void *arg, const char *name, uint32_t nlen, const char *value, uint32_t vlen) {
    kp_h2_hdrs *h = (kp_h2_hdrs *)arg;
    h->list_size += 32ull + nlen + vlen;
    if (h->list_size > h->s->max_header_list) {
        h->too_big = 1;
        return 0; /* keep decoding: the table must stay in step */
    }
    if (h->too_big) return 0;
    for (uint32_t i = 0; i < nlen; i++)
        if (name[i] >= 'A' && name[i] <= 'Z') h->malformed = 1; /* field names are lowercase in HTTP/2 */
    if (nlen && name[0] == ':') {
        if (h->regular_seen) h->malformed = 1;
        if (kp_h2_eq(name, nlen, ":path")) {
            if (vlen >= sizeof(h->path)) {
                h->path_len = -1;
            } else {
                memcpy(h->path, value, vlen);
                h->path_len = (int)vlen;
            }
            h->have_path = 1;
        } else if (kp_h2_eq(name, nlen, ":method")) {
            h->method_post = kp_h2_eq(value, vlen, "POST");
        }
        return 0;
    }
    h->regular_seen = 1;
    if (kp_h2_eq(name, nlen, "content-type")) {
        h->content_grpc = vlen >= 16 && memcmp(value, "application/grpc", 16) == 0 &&
                          (vlen == 16 || value[16] == '+' || value[16] == ';');
        return 0;
    }
    if (kp_h2_eq(name, nlen, "grpc-timeout")) {
        h->timeout = kp_h2_parse_timeout(value, vlen);
        return 0;
    }
    if (kp_h2_eq(name, nlen, "grpc-encoding")) {
        h->encoding = kp_h2_eq(value, vlen, "identity") ? KP_H2_ENC_IDENTITY
                      : kp_h2_eq(value, vlen, "gzip")   ? KP_H2_ENC_GZIP
                      : kp_h2_eq(value, vlen, "deflate") ? KP_H2_ENC_DEFLATE
                                                          : KP_H2_ENC_OTHER;
        return 0;
    }
    if (kp_h2_eq(name, nlen, "te") || kp_h2_eq(name, nlen, "grpc-accept-encoding")) return 0;
    return kp_h2_meta_add(h, name, nlen, value, vlen);
}

static int kp_h2_method_index(kp_h2_server *s, const char *path, int len) {
    for (int i = 0; i < s->nmethods; i++)
        if ((int)s->path_lens[i] == len && memcmp(s->paths[i], path, (size_t)len) == 0) return i;
    return -1;
}

static void kp_h2_deliver_unary(kp_h2_server *s, kp_h2_conn *c, kp_h2_stream *st);

/* A complete header block for stream hstream. Caller holds c->mu. */
/* The item that hands a call to Python, taking the stream's metadata; NULL when out of memory (the
 * stream is then failed). */
static kp_h2_item *kp_h2_call_item(kp_h2_server *s, kp_h2_conn *c, kp_h2_stream *st, int kind) {
    kp_h2_item *it = kp_h2_item_new(kind, kp_h2_call_id(kp_h2_conn_slot(s, c), c->gen, st->id));
    if (!it) {
        kp_h2_fail_stream(s, c, st, KP_G_RESOURCE, "server out of memory");
        return NULL;
    }
    it->method = st->method;
    it->deadline = st->deadline;
    it->meta = st->meta;
    it->meta_len = st->meta_len;
    st->meta = NULL;
    return it;
}

static void kp_h2_on_headers(kp_h2_server *s, kp_h2_conn *c) {
    uint32_t sid = c->hstream;
    int end_stream = (c->hflags & KP_FL_END_STREAM) != 0;
    kp_h2_hdrs h;
    memset(&h, 0, sizeof(h));
    h.s = s;
    h.timeout = -1;
    h.encoding = KP_H2_ENC_IDENTITY;
    int rc = kp_hpack_decode(&c->dyn, c->hblock, c->hlen, kp_h2_header_sink, &h);
    c->hlen = 0;
    c->in_headers = 0;
    if (rc < 0) { /* the table may be out of step with the peer's: the connection cannot go on */
        free(h.meta);
        kp_h2_conn_error(s, c, rc == -1 ? KP_E_COMPRESSION : KP_E_INTERNAL);
        return;
    }
    kp_h2_stream *st = kp_h2_find(c, sid);
    if (st) { /* trailers from the client: only END_STREAM matters */
        free(h.meta);
        if (st->remote_closed) { /* HEADERS on a half-closed stream (RFC 9113 5.1: STREAM_CLOSED) */
            kp_h2_fail_stream(s, c, st, KP_G_INTERNAL, "HEADERS after END_STREAM");
            return;
        }
        if (!end_stream) {
            kp_h2_fail_stream(s, c, st, KP_G_INTERNAL, "request trailers without END_STREAM");
            return;
        }
        st->remote_closed = 1;
        if (st->failed) return;
        if (st->client_streaming) {
            kp_h2_item *it = kp_h2_item_new(KP_H2_HALF_CLOSE, kp_h2_call_id(kp_h2_conn_slot(s, c), c->gen, sid));
            if (it) kp_h2_push(s, KP_H2_Q_EVENTS, it);
        } else {
            kp_h2_deliver_unary(s, c, st);
        }
        return;
    }
    if (sid <= c->last_stream_id || (sid & 1) == 0) {
        free(h.meta);
        if ((sid & 1) == 0) {
            kp_h2_conn_error(s, c, KP_E_PROTOCOL);
        } else {
            kp_h2_out_rst(c, sid, KP_E_STREAM_CLOSED); /* a stream that already ended */
        }
        return;
    }
    c->last_stream_id = sid;
    if (c->goaway_sent || (uint32_t)c->nstreams >= s->max_streams) {
        free(h.meta);
        kp_h2_out_rst(c, sid, KP_E_REFUSED);
        return;
    }
    st = (kp_h2_stream *)calloc(1, sizeof(kp_h2_stream));
    if (!st) {
        free(h.meta);
        kp_h2_out_rst(c, sid, KP_E_REFUSED);
        return;
    }
    st->id = sid;
    st->send_window = c->peer_initial_window;
    st->recv_window = KP_H2_STREAM_WINDOW;
    st->remote_closed = end_stream;
    st->next = c->streams;
    c->streams = st;
    c->nstreams++;
    st->meta = h.meta;
    st->meta_len = (uint32_t)h.mlen;
    st->method = -1;
    if (h.too_big) {
        kp_h2_fail_stream(s, c, st, KP_G_RESOURCE, "request header list is larger than the server accepts");
        return;
    }
    if (h.malformed || !h.have_path || !h.method_post || h.path_len <= 0) {
        kp_h2_fail_stream(s, c, st, KP_G_INTERNAL, "malformed request: a gRPC call is POST with a :path");
        return;
    }
    if (!h.content_grpc) {
        kp_h2_fail_stream(s, c, st, KP_G_INTERNAL, "content-type must be application/grpc");
        return;
    }
    st->method = kp_h2_method_index(s, h.path, h.path_len);
    if (st->method < 0) {
        char msg[600];
        snprintf(msg, sizeof(msg), "Method not found: %.*s", h.path_len, h.path);
        kp_h2_fail_stream(s, c, st, KP_G_UNIMPLEMENTED, msg);
        return;
    }
    if (h.encoding == KP_H2_ENC_OTHER) {
        kp_h2_fail_stream(s, c, st, KP_G_UNIMPLEMENTED,
                          "grpc-encoding not supported (identity, gzip and deflate are)");
        return;
    }
    st->encoding = h.encoding;
    if (h.timeout >= 0) {
        st->deadline = kp_h2_now() + h.timeout;
        if (st->deadline < s->next_scan) s->next_scan = st->deadline;
    }
    st->client_streaming = s->streaming[st->method];
    if (st->client_streaming) {
        kp_h2_item *it = kp_h2_call_item(s, c, st, KP_H2_START);
        if (!it) return;
        st->dispatched = 1;
        kp_h2_push(s, KP_H2_Q_EVENTS, it);
        if (end_stream) {
            it = kp_h2_item_new(KP_H2_HALF_CLOSE, kp_h2_call_id(kp_h2_conn_slot(s, c), c->gen, sid));
            if (it) kp_h2_push(s, KP_H2_Q_EVENTS, it);
        }
    } else if (end_stream) {
        kp_h2_deliver_unary(s, c, st);
    }
}

/* The request side of a unary-request call ended: hand over the call with its one message. */
/* A varint at p[*off..n); -1 when it runs past the end or over 10 bytes. */
static int kp_h2_pb_varint(const uint8_t *p, size_t n, size_t *off, uint64_t *v) {
    uint64_t r = 0;
    for (int shift = 0; shift < 70 && *off < n; shift += 7) {
        uint8_t b = p[(*off)++];
        r |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = r;
            return 0;
        }
    }
    return -1;
}

/* The model_name (field 1) of a serialized ModelInferRequest, and whether it has parameters (field 4:
 * a priority, a timeout or a tenant may change which queue it joins). -1 when it does not parse: the
 * Python handler then says what is wrong. */
static int kp_h2_infer_model(const uint8_t *p, size_t n, const uint8_t **name, uint32_t *nlen, int *params) {
    size_t off = 0;
    *name = NULL;
    *nlen = 0;
    *params = 0;
    while (off < n) {
        uint64_t key, len;
        if (kp_h2_pb_varint(p, n, &off, &key) < 0) return -1;
        switch (key & 7) {
        case 0:
            if (kp_h2_pb_varint(p, n, &off, &len) < 0) return -1;
            break;
        case 1:
            if (n - off < 8) return -1;
            off += 8;
            break;
        case 5:
            if (n - off < 4) return -1;
            off += 4;
            break;
        case 2:
            if (kp_h2_pb_varint(p, n, &off, &len) < 0 || len > n - off) return -1;
            if (key >> 3 == 1) {
                *name = p + off;
                *nlen = (uint32_t)len;
            } else if (key >> 3 == 4) {
                *params = 1;
            }
            off += len;
            break;
        default:
            return -1;
        }
    }
    return *name ? 0 : -1;
}

/* ModelInfer for a model whose queue is full (its max_queue_size reached): refuse it here with the same
 * status and message as the data plane (RESOURCE_EXHAUSTED), counted in the model's rejections, instead of
 * waking a Python thread only to be refused. Requests with parameters go to Python (their queue may be a
 * priority level's own). Returns 1 when the call was answered. */
static int kp_h2_admit_refuse(kp_h2_server *s, kp_h2_conn *c, kp_h2_stream *st) {
    const uint8_t *name;
    uint32_t nlen;
    int params, refuse = 0;
    if (st->method != s->infer_method || !s->nadmit || st->umsg_compressed) return 0;
    if (kp_h2_infer_model(st->umsg, st->umsg_len, &name, &nlen, &params) < 0 || params) return 0;
    if (nlen == 0 || nlen >= KP_H2_ADMIT_NAME) return 0;
    pthread_mutex_lock(&s->admu);
    for (int i = 0; i < s->nadmit; i++) {
        if (s->admit[i].nlen != nlen || memcmp(s->admit[i].name, name, nlen) != 0) continue;
        kp_doorbell *d = s->admit[i].db;
        uint32_t limit = atomic_load_explicit(&d->max_queue, KP_RELAXED);
        if (limit && atomic_load_explicit(&d->queued, KP_ACQUIRE) >= limit) {
            atomic_fetch_add_explicit(&d->rejected, 1, KP_RELAXED);
            refuse = 1;
        }
        break;
    }
    pthread_mutex_unlock(&s->admu);
    if (!refuse) return 0;
    char msg[KP_H2_ADMIT_NAME + 64];
    snprintf(msg, sizeof msg, "model '%.*s': the queue is full (max_queue_size)", (int)nlen, (const char *)name);
    s->rejected_total++;
    kp_h2_fail_stream(s, c, st, KP_G_RESOURCE, msg);
    return 1;
}

/* Python side: check ModelInfer (method index `method`, -1: never) against these models' queues. */
static void kp_h2_set_infer_method(kp_h2_server *s, int method) {
    pthread_mutex_lock(&s->admu);
    s->infer_method = method;
    pthread_mutex_unlock(&s->admu);
}

/* Add or replace (db non-NULL) or remove (db NULL) a model in the admission table; -1 when it is full or
 * the name too long. The caller keeps `db` mapped while it is in the table. */
static int kp_h2_set_admission(kp_h2_server *s, const char *name, uint32_t nlen, kp_doorbell *db) {
    int rc = 0, i;
    if (nlen == 0 || nlen >= KP_H2_ADMIT_NAME) return -1;
    pthread_mutex_lock(&s->admu);
    for (i = 0; i < s->nadmit; i++)
        if (s->admit[i].nlen == nlen && memcmp(s->admit[i].name, name, nlen) == 0) break;
    if (db == NULL) {
        if (i < s->nadmit) s->admit[i] = s->admit[--s->nadmit];
    } else if (i < s->nadmit) {
        s->admit[i].db = db;
    } else if (s->nadmit < KP_H2_ADMIT_MAX) {
        memcpy(s->admit[i].name, name, nlen);
        s->admit[i].nlen = nlen;
        s->admit[i].db = db;
        s->nadmit++;
    } else {
        rc = -1;
    }
    pthread_mutex_unlock(&s->admu);
    return rc;
}

static void kp_h2_deliver_unary(kp_h2_server *s, kp_h2_conn *c, kp_h2_stream *st) {
    if (st->pfx_have || st->msg) {
        kp_h2_fail_stream(s, c, st, KP_G_INTERNAL, "the request ended inside a message");
        return;
    }
    if (st->nmsgs != 1) {
        kp_h2_fail_stream(s, c, st, st->nmsgs ? KP_G_UNIMPLEMENTED : KP_G_INTERNAL,
                          st->nmsgs ? "more than one request message for a unary call" : "missing request message");
        return;
    }
    if (kp_h2_admit_refuse(s, c, st)) return;
    kp_h2_item *it = kp_h2_call_item(s, c, st, KP_H2_CALL);
    if (!it) return;
    it->data = st->umsg;
    it->len = st->umsg_len;
    it->compressed = st->umsg_compressed;
    st->umsg = NULL;
    st->dispatched = 1;
    s->calls_total++;
    kp_h2_push(s, KP_H2_Q_CALLS, it);
}

/* Message bytes of a stream's DATA (gRPC length-prefixed messages). Returns 0, or -1 when the stream was
 * failed (and removed). */
static int kp_h2_on_message_bytes(kp_h2_server *s, kp_h2_conn *c, kp_h2_stream *st, const uint8_t *p, size_t n) {
    while (n) {
        if (!st->msg) {
            size_t take = 5 - st->pfx_have;
            if (take > n) take = n;
            memcpy(st->pfx + st->pfx_have, p, take);
            st->pfx_have += (uint32_t)take;
            p += take;
            n -= take;
            if (st->pfx_have < 5) return 0;
            uint32_t len = kp_h2_u32(st->pfx + 1);
            if (st->pfx[0] > 1 || (st->pfx[0] == 1 && st->encoding == KP_H2_ENC_IDENTITY)) {
                kp_h2_fail_stream(s, c, st, KP_G_INTERNAL,
                                  st->pfx[0] > 1 ? "invalid message flags"
                                                 : "a compressed message without a grpc-encoding");
                return -1;
            }
            st->msg_compressed = st->pfx[0] == 1 ? st->encoding : 0;
            if ((uint64_t)len > s->max_msg) {
                char msg[160];
                snprintf(msg, sizeof(msg), "Received message larger than max (%u vs. %llu)", len,
                         (unsigned long long)s->max_msg);
                kp_h2_fail_stream(s, c, st, KP_G_RESOURCE, msg);
                return -1;
            }
            if (!st->client_streaming && st->nmsgs >= 1) {
                kp_h2_fail_stream(s, c, st, KP_G_UNIMPLEMENTED, "more than one request message for a unary call");
                return -1;
            }
            st->msg = (uint8_t *)malloc(len ? len : 1);
            if (!st->msg) {
                kp_h2_fail_stream(s, c, st, KP_G_RESOURCE, "server out of memory");
                return -1;
            }
            st->msg_len = len;
            st->msg_have = 0;
        }
        size_t take = st->msg_len - st->msg_have;
        if (take > n) take = n;
        memcpy(st->msg + st->msg_have, p, take);
        st->msg_have += (uint32_t)take;
        p += take;
        n -= take;
        if (st->msg_have == st->msg_len) {
            st->nmsgs++;
            st->pfx_have = 0;
            if (st->client_streaming) {
                kp_h2_item *it = kp_h2_item_new(KP_H2_MSG, kp_h2_call_id(kp_h2_conn_slot(s, c), c->gen, st->id));
                if (!it) {
                    kp_h2_fail_stream(s, c, st, KP_G_RESOURCE, "server out of memory");
                    return -1;
                }
                it->data = st->msg;
                it->len = st->msg_len;
                it->compressed = st->msg_compressed;
                kp_h2_push(s, KP_H2_Q_EVENTS, it);
            } else {
                st->umsg = st->msg;
                st->umsg_len = st->msg_len;
                st->umsg_compressed = st->msg_compressed;
            }
            st->msg = NULL;
            st->msg_len = st->msg_have = 0;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* frames (caller holds c->mu). Returns -1 after a connection error. */

static int kp_h2_frame(kp_h2_server *s, kp_h2_conn *c, const uint8_t *f, uint32_t len) {
    uint8_t type = f[3], flags = f[4];
    uint32_t sid = kp_h2_u32(f + 5) & 0x7fffffffu;
    const uint8_t *p = f + 9;

    if (!c->settings_seen && type != KP_F_SETTINGS) goto proto; /* the client preface ends with SETTINGS */
    if (c->in_headers && (type != KP_F_CONT || sid != c->hstream)) goto proto;

    switch (type) {
    case KP_F_DATA: {
        if (sid == 0) goto proto;
        uint32_t pad = 0;
        if (flags & KP_FL_PADDED) {
            if (len < 1) goto proto;
            pad = p[0];
            p++;
            if (pad + 1 > len) goto proto;
        }
        size_t n = len - ((flags & KP_FL_PADDED) ? 1 + pad : 0);
        c->recv_window -= len;
        if (c->recv_window < 0) {
            kp_h2_conn_error(s, c, KP_E_FLOW);
            return -1;
        }
        c->recv_unacked += len;
        if (c->recv_unacked >= KP_H2_CONN_WINDOW / 4) {
            kp_h2_out_window(c, 0, c->recv_unacked);
            c->recv_window += c->recv_unacked;
            c->recv_unacked = 0;
        }
        kp_h2_stream *st = kp_h2_find(c, sid);
        if (!st) {
            if (sid > c->last_stream_id) goto proto; /* DATA on an idle stream */
            kp_h2_out_rst(c, sid, KP_E_STREAM_CLOSED);
            return 0;
        }
        if (st->remote_closed) {
            kp_h2_fail_stream(s, c, st, KP_G_INTERNAL, "DATA after END_STREAM");
            return 0;
        }
        st->recv_window -= len;
        if (st->recv_window < 0) {
            kp_h2_out_rst(c, sid, KP_E_FLOW);
            st->remote_closed = 1;
            kp_h2_stream_end(s, c, st);
            return 0;
        }
        /* Unary requests are bounded by the message size: give the window back at once. Streaming ones
         * get it back as Python takes their messages (kp_h2_consumed), so a client that sends faster
         * than the server reads is held by flow control. Padding is given back at once. */
        uint32_t back = st->client_streaming ? (uint32_t)(len - n) : len;
        st->recv_unacked += back;
        if (st->recv_unacked >= KP_H2_STREAM_WINDOW / 4 && !(flags & KP_FL_END_STREAM)) {
            kp_h2_out_window(c, sid, st->recv_unacked);
            st->recv_window += st->recv_unacked;
            st->recv_unacked = 0;
        }
        if (!st->failed && kp_h2_on_message_bytes(s, c, st, p, n) < 0) return 0;
        if (flags & KP_FL_END_STREAM) {
            st->remote_closed = 1;
            if (st->client_streaming) {
                if (st->pfx_have || st->msg) {
                    kp_h2_fail_stream(s, c, st, KP_G_INTERNAL, "the request ended inside a message");
                    return 0;
                }
                kp_h2_item *it = kp_h2_item_new(KP_H2_HALF_CLOSE, kp_h2_call_id(kp_h2_conn_slot(s, c), c->gen, sid));
                if (it) kp_h2_push(s, KP_H2_Q_EVENTS, it);
            } else {
                kp_h2_deliver_unary(s, c, st);
            }
        }
        return 0;
    }
    case KP_F_HEADERS: {
        if (sid == 0) goto proto;
        size_t off = 0, pad = 0;
        if (flags & KP_FL_PADDED) {
            if (len < 1) goto proto;
            pad = p[0];
            off = 1;
        }
        if (flags & KP_FL_PRIORITY) off += 5;
        if (off + pad > len) goto proto;
        size_t n = len - off - pad;
        if (n > KP_H2_MAX_HEADER_BLOCK) goto calm;
        if (c->hcap < n) {
            size_t cap = n < 4096 ? 4096 : n;
            uint8_t *b = (uint8_t *)realloc(c->hblock, cap);
            if (!b) goto calm;
            c->hblock = b;
            c->hcap = cap;
        }
        memcpy(c->hblock, p + off, n);
        c->hlen = n;
        c->hstream = sid;
        c->hflags = flags;
        if (flags & KP_FL_END_HEADERS) {
            kp_h2_on_headers(s, c);
        } else {
            c->in_headers = 1;
        }
        return c->broken ? -1 : 0;
    }
    case KP_F_CONT: {
        if (!c->in_headers || sid != c->hstream) goto proto;
        if (c->hlen + len > KP_H2_MAX_HEADER_BLOCK) goto calm;
        if (c->hcap < c->hlen + len) {
            size_t cap = c->hcap * 2;
            while (cap < c->hlen + len) cap *= 2;
            uint8_t *b = (uint8_t *)realloc(c->hblock, cap);
            if (!b) goto calm;
            c->hblock = b;
            c->hcap = cap;
        }
        memcpy(c->hblock + c->hlen, p, len);
        c->hlen += len;
        if (flags & KP_FL_END_HEADERS) kp_h2_on_headers(s, c);
        return c->broken ? -1 : 0;
    }
    case KP_F_PRIORITY:
        if (sid == 0) goto proto;
        if (len != 5) {
            kp_h2_out_rst(c, sid, KP_E_FRAME_SIZE);
        }
        return 0;
    case KP_F_RST: {
        if (sid == 0) goto proto;
        if (len != 4) {
            kp_h2_conn_error(s, c, KP_E_FRAME_SIZE);
            return -1;
        }
        if (sid > c->last_stream_id) goto proto;
        kp_h2_stream *st = kp_h2_find(c, sid);
        if (st) {
            st->remote_closed = 1;
            kp_h2_stream_end(s, c, st);
        }
        return 0;
    }
    case KP_F_SETTINGS: {
        if (sid != 0) goto proto;
        if (flags & KP_FL_ACK) {
            if (len != 0) {
                kp_h2_conn_error(s, c, KP_E_FRAME_SIZE);
                return -1;
            }
            return 0;
        }
        if (len % 6) {
            kp_h2_conn_error(s, c, KP_E_FRAME_SIZE);
            return -1;
        }
        for (uint32_t i = 0; i < len; i += 6) {
            uint16_t id = (uint16_t)((p[i] << 8) | p[i + 1]);
            uint32_t v = kp_h2_u32(p + i + 2);
            if (id == 0x2 && v > 1) goto proto;
            if (id == 0x4) {
                if (v > 0x7fffffffu) {
                    kp_h2_conn_error(s, c, KP_E_FLOW);
                    return -1;
                }
                int64_t delta = (int64_t)v - (int64_t)c->peer_initial_window;
                for (kp_h2_stream *st = c->streams; st; st = st->next) {
                    st->send_window += delta;
                    if (st->send_window > 0x7fffffff) {
                        kp_h2_conn_error(s, c, KP_E_FLOW);
                        return -1;
                    }
                }
                c->peer_initial_window = v;
            } else if (id == 0x5) {
                if (v < 16384 || v > 16777215) goto proto;
                c->peer_max_frame = v;
            }
            /* HEADER_TABLE_SIZE: our encoder never indexes; MAX_CONCURRENT_STREAMS: we never push;
             * MAX_HEADER_LIST_SIZE: our header lists are small. Unknown settings are ignored. */
        }
        c->settings_seen = 1;
        kp_h2_out_frame(c, 0, KP_F_SETTINGS, KP_FL_ACK, 0);
        kp_h2_pump_all(s, c);
        return 0;
    }
    case KP_F_PUSH:
        goto proto; /* clients never push */
    case KP_F_PING: {
        if (sid != 0) goto proto;
        if (len != 8) {
            kp_h2_conn_error(s, c, KP_E_FRAME_SIZE);
            return -1;
        }
        if (!(flags & KP_FL_ACK)) {
            uint8_t *q = kp_h2_out_frame(c, 8, KP_F_PING, KP_FL_ACK, 0);
            if (q) memcpy(q, p, 8);
        }
        return 0;
    }
    case KP_F_GOAWAY:
        if (sid != 0 || len < 8) goto proto;
        return 0; /* the peer opens no more streams; those in flight finish */
    case KP_F_WINDOW: {
        if (len != 4) {
            kp_h2_conn_error(s, c, KP_E_FRAME_SIZE);
            return -1;
        }
        uint32_t inc = kp_h2_u32(p) & 0x7fffffffu;
        if (sid == 0) {
            if (inc == 0) goto proto;
            c->send_window += inc;
            if (c->send_window > 0x7fffffff) {
                kp_h2_conn_error(s, c, KP_E_FLOW);
                return -1;
            }
            kp_h2_pump_all(s, c);
            return 0;
        }
        kp_h2_stream *st = kp_h2_find(c, sid);
        if (!st) return 0; /* a stream that already ended */
        if (inc == 0 || st->send_window + inc > 0x7fffffff) {
            kp_h2_out_rst(c, sid, inc == 0 ? KP_E_PROTOCOL : KP_E_FLOW);
            st->remote_closed = 1;
            kp_h2_stream_end(s, c, st);
            return 0;
        }
        st->send_window += inc;
        if ((st->pend || st->trailers) && kp_h2_pump(c, st)) kp_h2_finish_stream(s, c, st);
        return 0;
    }
    default:
        return 0; /* unknown frame types are ignored (RFC 9113 4.1) */
    }
proto:
    kp_h2_conn_error(s, c, KP_E_PROTOCOL);
    return -1;
calm:
    kp_h2_conn_error(s, c, KP_E_CALM);
    return -1;
}

static const char kp_h2_preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/* Readable connection (loop thread). */
static void kp_h2_on_readable(kp_h2_server *s, kp_h2_conn *c) {
    size_t budget = 4u << 20; /* then let other connections run */
    int eof = 0;
    while (budget) {
        if (c->rcap - c->rlen < 65536) {
            size_t cap = c->rcap * 2 > c->rlen + 65536 ? c->rcap * 2 : c->rlen + 65536;
            uint8_t *b = (uint8_t *)realloc(c->rbuf, cap);
            if (!b) {
                eof = 1;
                break;
            }
            c->rbuf = b;
            c->rcap = cap;
        }
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, MSG_DONTWAIT);
        if (n > 0) {
            c->rlen += (size_t)n;
            budget = (size_t)n > budget ? 0 : budget - (size_t)n;
            if (c->rlen < c->rcap) break; /* the socket is (probably) drained */
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        eof = 1;
        break;
    }
    pthread_mutex_lock(&c->mu);
    size_t off = 0;
    if (!c->preface_ok) {
        size_t have = c->rlen < 24 ? c->rlen : 24;
        if (memcmp(c->rbuf, kp_h2_preface, have) != 0) {
            kp_h2_conn_error(s, c, KP_E_PROTOCOL);
            goto done;
        }
        if (c->rlen >= 24) {
            c->preface_ok = 1;
            off = 24;
        }
    }
    while (c->preface_ok && !c->broken && c->rlen - off >= 9) {
        const uint8_t *f = c->rbuf + off;
        uint32_t len = ((uint32_t)f[0] << 16) | ((uint32_t)f[1] << 8) | f[2];
        if (len > KP_H2_MAX_FRAME) {
            kp_h2_conn_error(s, c, KP_E_FRAME_SIZE);
            break;
        }
        if (c->rlen - off < 9 + (size_t)len) {
            if (c->rcap < 9 + (size_t)len) { /* make room for the whole frame */
                uint8_t *b = (uint8_t *)realloc(c->rbuf, 9 + (size_t)len + 65536);
                if (!b) {
                    kp_h2_conn_error(s, c, KP_E_INTERNAL);
                    break;
                }
                c->rbuf = b;
                c->rcap = 9 + (size_t)len + 65536;
            }
            break;
        }
        if (kp_h2_frame(s, c, f, len) < 0) break;
        off += 9 + (size_t)len;
    }
    if (off) {
        memmove(c->rbuf, c->rbuf + off, c->rlen - off);
        c->rlen -= off;
    }
    kp_h2_flush_pump(s, c);
done:;
    int close_it = eof || c->broken;
    pthread_mutex_unlock(&c->mu);
    if (close_it) kp_h2_conn_close(s, c);
}

/* Deadlines: a call past its deadline is answered DEADLINE_EXCEEDED and cancelled; a connection that has
 * not completed its preface in time is closed. */
static void kp_h2_scan_deadlines(kp_h2_server *s, double now) {
    double next = now + 3600;
    for (int i = 0; i < s->max_conns; i++) {
        kp_h2_conn *c = &s->conns[i];
        if (!c->open) continue;
        if (!c->settings_seen) {
            if (now - c->accepted_at >= KP_H2_PREFACE_TIMEOUT) {
                kp_h2_conn_close(s, c);
                continue;
            }
            if (c->accepted_at + KP_H2_PREFACE_TIMEOUT < next) next = c->accepted_at + KP_H2_PREFACE_TIMEOUT;
        }
        pthread_mutex_lock(&c->mu);
        kp_h2_stream *st = c->streams;
        int wrote = 0;
        while (st) {
            kp_h2_stream *nx = st->next;
            if (st->deadline > 0 && !st->local_closed) {
                if (st->deadline <= now) {
                    kp_h2_fail_stream(s, c, st, KP_G_DEADLINE, "Deadline Exceeded");
                    wrote = 1;
                } else if (st->deadline < next) {
                    next = st->deadline;
                }
            }
            st = nx;
        }
        if (wrote) kp_h2_flush(s, c);
        pthread_mutex_unlock(&c->mu);
    }
    s->next_scan = next;
}

static void *kp_h2_loop(void *arg) {
    kp_h2_server *s = (kp_h2_server *)arg;
    struct epoll_event evs[64];
    while (!s->stop_flag) {
        double now = kp_h2_now();
        int timeout_ms = 1000;
        if (s->next_scan - now < 1.0) timeout_ms = s->next_scan <= now ? 0 : (int)((s->next_scan - now) * 1000) + 1;
        int n = epoll_wait(s->epfd, evs, 64, timeout_ms);
        if (n < 0 && errno != EINTR) break;
        for (int i = 0; i < n; i++) {
            uint64_t key = evs[i].data.u64;
            if (key == UINT64_MAX) { /* the listening socket */
                if (!s->shut) kp_h2_accept(s);
                continue;
            }
            if (key == UINT64_MAX - 1) { /* eventfd: stop or shutdown */
                uint64_t v;
                if (read(s->evfd, &v, sizeof(v)) < 0) { /* nothing to do */ }
                continue;
            }
            kp_h2_conn *c = &s->conns[key];
            if (!c->open) continue;
            uint32_t e = evs[i].events;
            if (e & EPOLLOUT) {
                pthread_mutex_lock(&c->mu);
                kp_h2_flush_pump(s, c);
                int broken = c->broken;
                pthread_mutex_unlock(&c->mu);
                if (broken) {
                    kp_h2_conn_close(s, c);
                    continue;
                }
            }
            if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) kp_h2_on_readable(s, c);
        }
        if (s->shutdown_flag && !s->shut) { /* stop accepting; tell every peer (GOAWAY NO_ERROR) */
            s->shut = 1;
            epoll_ctl(s->epfd, EPOLL_CTL_DEL, s->lfd, NULL);
            close(s->lfd);
            s->lfd = -1;
            for (int i = 0; i < s->max_conns; i++) {
                kp_h2_conn *c = &s->conns[i];
                if (!c->open) continue;
                pthread_mutex_lock(&c->mu);
                kp_h2_out_goaway(c, KP_E_NO_ERROR);
                kp_h2_flush(s, c);
                pthread_mutex_unlock(&c->mu);
            }
        }
        now = kp_h2_now();
        if (now >= s->next_scan) kp_h2_scan_deadlines(s, now);
    }
    for (int i = 0; i < s->max_conns; i++) kp_h2_conn_close(s, &s->conns[i]);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------------- */
/* API */

/* Create and bind (not yet running). Returns NULL and sets *err (an errno, or -1 for a bad argument). */
static kp_h2_server *kp_h2_create(const char *host, int port, int nmethods, const char *const *paths,
                                  const uint32_t *path_lens, const uint8_t *streaming, uint64_t max_msg,
                                  uint32_t max_header_list, uint32_t max_streams, int max_conns, int *err) {
    *err = 0;
    if (kp_huff_init() < 0 || nmethods < 0 || max_conns <= 0 || max_conns > 65535) {
        *err = -1;
        return NULL;
    }
    kp_h2_server *s = (kp_h2_server *)calloc(1, sizeof(kp_h2_server));
    if (!s) {
        *err = ENOMEM;
        return NULL;
    }
    s->lfd = s->epfd = s->evfd = -1;
    s->nmethods = nmethods;
    s->paths = (char **)calloc((size_t)nmethods + 1, sizeof(char *));
    s->path_lens = (uint32_t *)calloc((size_t)nmethods + 1, sizeof(uint32_t));
    s->streaming = (uint8_t *)calloc((size_t)nmethods + 1, 1);
    s->conns = (kp_h2_conn *)calloc((size_t)max_conns, sizeof(kp_h2_conn));
    if (!s->paths || !s->path_lens || !s->streaming || !s->conns) goto nomem;
    for (int i = 0; i < nmethods; i++) {
        s->paths[i] = (char *)malloc(path_lens[i] + 1);
        if (!s->paths[i]) goto nomem;
        memcpy(s->paths[i], paths[i], path_lens[i]);
        s->path_lens[i] = path_lens[i];
        s->streaming[i] = streaming[i];
    }
    s->max_msg = max_msg;
    s->max_header_list = max_header_list;
    s->max_streams = max_streams;
    s->max_conns = max_conns;
    s->next_scan = kp_h2_now() + 3600;
    for (int i = 0; i < max_conns; i++) {
        pthread_mutex_init(&s->conns[i].mu, NULL);
        s->conns[i].fd = -1;
    }
    pthread_mutex_init(&s->qmu, NULL);
    pthread_cond_init(&s->qcv[0], NULL);
    pthread_cond_init(&s->qcv[1], NULL);
    pthread_mutex_init(&s->admu, NULL);
    s->infer_method = -1;

    struct sockaddr_storage addr;
    socklen_t alen;
    memset(&addr, 0, sizeof(addr));
    int family = AF_INET;
    if (strchr(host, ':')) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&addr;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) {
            *err = -1;
            goto fail;
        }
        family = AF_INET6;
        alen = sizeof(*a);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&addr;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1) {
            *err = -1;
            goto fail;
        }
        alen = sizeof(*a);
    }
    s->lfd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->lfd < 0) goto sysfail;
    int one = 1;
    setsockopt(s->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(s->lfd, (struct sockaddr *)&addr, alen) < 0 || listen(s->lfd, 1024) < 0) goto sysfail;
    alen = sizeof(addr);
    getsockname(s->lfd, (struct sockaddr *)&addr, &alen);
    s->port = family == AF_INET ? ntohs(((struct sockaddr_in *)&addr)->sin_port)
                                : ntohs(((struct sockaddr_in6 *)&addr)->sin6_port);
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->epfd < 0 || s->evfd < 0) goto sysfail;
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.u64 = UINT64_MAX;
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->lfd, &ev) < 0) goto sysfail;
    ev.data.u64 = UINT64_MAX - 1;
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->evfd, &ev) < 0) goto sysfail;
    return s;
sysfail:
    *err = errno ? errno : EIO;
    goto fail;
nomem:
    *err = ENOMEM;
fail:
    if (s->lfd >= 0) close(s->lfd);
    if (s->epfd >= 0) close(s->epfd);
    if (s->evfd >= 0) close(s->evfd);
    if (s->paths)
        for (int i = 0; i < nmethods; i++) free(s->paths[i]);
    free(s->paths);
    free(s->path_lens);
    free(s->streaming);
    free(s->conns);
    free(s);
    return NULL;
}

static int kp_h2_start(kp_h2_server *s) {
    if (s->started) return 0;
    int rc = pthread_create(&s->thread, NULL, kp_h2_loop, s);
    if (rc == 0) s->started = 1;
    return rc;
}

static void kp_h2_wake(kp_h2_server *s) {
    uint64_t one = 1;
    if (write(s->evfd, &one, sizeof(one)) < 0) { /* the counter is full: the loop is awake anyway */
    }
}

/* Stop accepting and send GOAWAY to every connection; calls in flight go on. */
static void kp_h2_shutdown(kp_h2_server *s) {
    s->shutdown_flag = 1;
    kp_h2_wake(s);
}

/* Stop the loop, close every connection (cancelling what Python holds) and wake every waiter with NULL
 * once the queues are empty. */
static void kp_h2_stop(kp_h2_server *s) {
    if (s->started) {
        s->stop_flag = 1;
        kp_h2_wake(s);
        pthread_join(s->thread, NULL);
        s->started = 0;
    }
    pthread_mutex_lock(&s->qmu);
    s->qclosed = 1;
    /* calls never taken are dropped; events (cancellations) stay for the dispatcher to drain */
    kp_h2_item *it = s->qhead[KP_H2_Q_CALLS];
    while (it) {
        kp_h2_item *nx = it->next;
        kp_h2_item_free(it);
        it = nx;
    }
    s->qhead[KP_H2_Q_CALLS] = s->qtail[KP_H2_Q_CALLS] = NULL;
    pthread_cond_broadcast(&s->qcv[0]);
    pthread_cond_broadcast(&s->qcv[1]);
    pthread_mutex_unlock(&s->qmu);
}

static void kp_h2_free(kp_h2_server *s) {
    if (!s) return;
    kp_h2_stop(s);
    for (int q = 0; q < 2; q++) {
        kp_h2_item *it = s->qhead[q];
        while (it) {
            kp_h2_item *nx = it->next;
            kp_h2_item_free(it);
            it = nx;
        }
    }
    if (s->lfd >= 0) close(s->lfd);
    close(s->epfd);
    close(s->evfd);
    for (int i = 0; i < s->nmethods; i++) free(s->paths[i]);
    free(s->paths);
    free(s->path_lens);
    free(s->streaming);
    for (int i = 0; i < s->max_conns; i++) pthread_mutex_destroy(&s->conns[i].mu);
    pthread_mutex_destroy(&s->admu);
    free(s->conns);
    free(s);
}

/* Lock the connection of a call id and find its stream; NULL (nothing locked) when either is gone. */
static kp_h2_stream *kp_h2_lookup(kp_h2_server *s, uint64_t call_id, kp_h2_conn **out) {
    uint32_t slot = (uint32_t)(call_id >> 48);
    uint32_t gen = (uint32_t)(call_id >> 32) & 0xffffu;
    uint32_t sid = (uint32_t)call_id;
    if (slot >= (uint32_t)s->max_conns) return NULL;
    kp_h2_conn *c = &s->conns[slot];
    pthread_mutex_lock(&c->mu);
    if (!c->open || (c->gen & 0xffffu) != gen || c->broken) {
        pthread_mutex_unlock(&c->mu);
        return NULL;
    }
    kp_h2_stream *st = kp_h2_find(c, sid);
    if (!st || st->local_closed || st->failed) {
        pthread_mutex_unlock(&c->mu);
        return NULL;
    }
    *out = c;
    return st;
}

/* Answer a call: an optional response message, then the status. Any thread. Returns 1 when queued for
 * the peer, 0 when the call is gone (reset, expired, connection lost). */
static int kp_h2_respond(kp_h2_server *s, uint64_t call_id, const uint8_t *data, size_t len, int has_data,
                         int status, const char *msg, size_t mlen) {
    kp_h2_conn *c;
    kp_h2_stream *st = kp_h2_lookup(s, call_id, &c);
    if (!st) return 0;
    st->answered = 1;
    if (kp_h2_stream_write(c, st, data, len, has_data, 1, status, msg, mlen)) kp_h2_finish_stream(s, c, st);
    kp_h2_flush_pump(s, c);
    pthread_mutex_unlock(&c->mu);
    return 1;
}

/* One message of a server-streaming response. Returns 1, or 0 when the call is gone. `backlog` gets the
 * bytes of this stream not yet framed (waiting for the peer's window). */
static int kp_h2_send(kp_h2_server *s, uint64_t call_id, const uint8_t *data, size_t len, size_t *backlog) {
    kp_h2_conn *c;
    kp_h2_stream *st = kp_h2_lookup(s, call_id, &c);
    if (!st) return 0;
    kp_h2_stream_write(c, st, data, len, 1, 0, 0, NULL, 0);
    kp_h2_flush_pump(s, c);
    *backlog = st->pend ? st->pend_len - st->pend_off : 0;
    pthread_mutex_unlock(&c->mu);
    return 1;
}

/* Bytes of a streaming response not yet framed (waiting for the peer's window); -1 when the call is gone. */
static long long kp_h2_backlog(kp_h2_server *s, uint64_t call_id) {
    kp_h2_conn *c;
    kp_h2_stream *st = kp_h2_lookup(s, call_id, &c);
    if (!st) return -1;
    long long n = st->pend ? (long long)(st->pend_len - st->pend_off) : 0;
    pthread_mutex_unlock(&c->mu);
    return n;
}

/* Python took n bytes of a streaming call's messages: give the peer that much stream window back. */
static void kp_h2_consumed(kp_h2_server *s, uint64_t call_id, uint32_t n) {
    kp_h2_conn *c;
    kp_h2_stream *st = kp_h2_lookup(s, call_id, &c);
    if (!st) return;
    st->recv_unacked += n + 5;
    if (st->recv_unacked >= KP_H2_STREAM_WINDOW / 4 && !st->remote_closed) {
        kp_h2_out_window(c, st->id, st->recv_unacked);
        st->recv_window += st->recv_unacked;
        st->recv_unacked = 0;
        kp_h2_flush(s, c);
    }
    pthread_mutex_unlock(&c->mu);
}

/* Is the call still open (not reset, expired, answered or disconnected)? */
static int kp_h2_active(kp_h2_server *s, uint64_t call_id) {
    kp_h2_conn *c;
    kp_h2_stream *st = kp_h2_lookup(s, call_id, &c);
    if (!st) return 0;
    int active = !st->answered;
    pthread_mutex_unlock(&c->mu);
    return active;
}

/* The peer address of a call's connection ("ipv4:127.0.0.1:5000"), "" when gone. */
static void kp_h2_peer(kp_h2_server *s, uint64_t call_id, char *out, size_t cap) {
    uint32_t slot = (uint32_t)(call_id >> 48);
    out[0] = 0;
    if (slot >= (uint32_t)s->max_conns || cap == 0) return;
    kp_h2_conn *c = &s->conns[slot];
    pthread_mutex_lock(&c->mu);
    if (c->open && (c->gen & 0xffffu) == ((uint32_t)(call_id >> 32) & 0xffffu)) snprintf(out, cap, "%s", c->peer);
    pthread_mutex_unlock(&c->mu);
}

#endif /* KP_H2_H */
