/* wanemu: the WAN emulator process in C, the same program as kvwire/testing/emulator.py. Its own work per packet
 * costs ~15x less CPU; the forwarding that its verdicts run in the kernel costs what it costs either way.
 *
 * Owns: the middle namespace's event loop -- NFQUEUE over raw netlink (bind queues with a copy range, a
 * queue length and the GSO flag; read packet notifications for id and length only; batched accept verdicts,
 * single drop verdicts), one link model per direction exactly as linkmodel.py's LinkDirection (Bernoulli
 * loss, drop-tail queue in bytes before a serialiser at the bottleneck rate, fixed one-way delay, the same
 * counters, runtime update of any field), a FIFO of (release time, packet id) per direction released with
 * the same slack and late counters -- and the same control channel: the config JSON in argv[1], the ready
 * line, JSON lines on stdin (update, stats, stop), one JSON reply per line on stdout, the same stats keys.
 * Two threads: a reader stamps and decides each packet as soon as its notification arrives, while the main
 * thread sleeps until the next release and sends the verdicts (a batch accept runs the forwarding and the
 * receiving host's stack inside that system call: one thread would leave arrivals unread meanwhile).
 * The link model is wanemu_link.h's and the control channel's JSON reader wanemu_json.h's, both included here (one
 * translation unit; cemu.py hashes all three). Must not know: namespaces, addresses, the tests. Everything read
 * from the kernel is bounds-checked.
 * Build: cc -O2 -std=gnu11 -Wall -Wextra -pthread -o wanemu wanemu.c  (kvwire/testing/cemu.py does it on demand).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/netlink.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#define SOL_NETLINK_ 270
#define NETLINK_NO_ENOBUFS_ 5
#define NFNL_SUBSYS_QUEUE 3
#define MSG_PACKET (NFNL_SUBSYS_QUEUE << 8 | 0)
#define MSG_VERDICT (NFNL_SUBSYS_QUEUE << 8 | 1)
#define MSG_CONFIG (NFNL_SUBSYS_QUEUE << 8 | 2)
#define MSG_VERDICT_BATCH (NFNL_SUBSYS_QUEUE << 8 | 3)
enum { CFG_CMD = 1, CFG_PARAMS = 2, CFG_QUEUE_MAXLEN = 3, CFG_MASK = 4, CFG_FLAGS = 5 };
enum { CMD_BIND = 1, CMD_UNBIND = 2, COPY_PACKET = 2, F_GSO = 4 };
enum { A_PACKET_HDR = 1, A_VERDICT_HDR = 2, A_PAYLOAD = 10, A_CAP_LEN = 13 };
enum { NF_DROP_ = 0, NF_ACCEPT_ = 1 };

#define MAX_DIRS 8
#define RECV_BATCH 256   /* notifications per recvmmsg */
#define RECV_BUF 4096    /* bytes per notification buffer (copy_range 40: a few hundred bytes each) */
#define SLACK 50e-6      /* release packets due this soon now */
#define IDLE_WAIT 0.5
#define OUT_CAP (64 << 10)

#include "wanemu_json.h"  /* the control channel's flat JSON reader */
#include "wanemu_link.h"  /* the link model, one per direction */

/* ------------------------------------------------------------------ state */
static dir_t dirs[MAX_DIRS];
static int ndirs;
static int nl = -1;
static uint32_t seq;
static unsigned long long turns, late_releases, late_5ms;
static double late_max;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER; /* the models, FIFOs and counters */
static int wake_fd = -1; /* eventfd: the reader filled an empty FIFO, the releaser may sleep too long */
typedef struct { char b[OUT_CAP]; size_t len; } outbuf;

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die_json(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("{\"ok\": false, \"error\": \"%s\"}\n", msg);
    fflush(stdout);
    exit(1);
}

/* ------------------------------------------------------------------ netlink messages (nfqueue.py) */
static size_t put_attr(char *b, size_t off, uint16_t type, const void *data, uint16_t len) {
    struct nlattr a = { .nla_len = (uint16_t)(NLA_HDRLEN + len), .nla_type = type };
    memcpy(b + off, &a, sizeof a);
    memcpy(b + off + NLA_HDRLEN, data, len);
    size_t n = NLA_ALIGN(NLA_HDRLEN + len);
    memset(b + off + NLA_HDRLEN + len, 0, n - NLA_HDRLEN - len);
    return off + n;
}

/* writes the nlmsghdr + nfgenmsg header at b; returns the offset of the first attribute */
static size_t put_head(char *b, uint16_t type, uint16_t flags, uint32_t sq, int queue) {
    struct nlmsghdr h = { .nlmsg_len = 0, .nlmsg_type = type, .nlmsg_flags = flags, .nlmsg_seq = sq };
    memcpy(b, &h, sizeof h);
    b[16] = AF_UNSPEC; b[17] = 0;
    uint16_t res = htons((uint16_t)queue);
    memcpy(b + 18, &res, 2);
    return 20;
}

static void finish(char *b, size_t len) { uint32_t l = (uint32_t)len; memcpy(b, &l, 4); }

static void flush_out(outbuf *o) {
    if (o->len && send(nl, o->b, o->len, 0) < 0 && errno != EINTR)
        fprintf(stderr, "wanemu: verdict send failed: %s\n", strerror(errno));
    o->len = 0;
}

static void add_verdict(outbuf *o, int queue, uint32_t id, int accept, int batch) {
    if (o->len + 64 > sizeof o->b) flush_out(o);
    char *b = o->b + o->len;
    uint32_t vh[2] = { htonl(accept ? NF_ACCEPT_ : NF_DROP_), htonl(id) };
    size_t n = put_head(b, batch ? MSG_VERDICT_BATCH : MSG_VERDICT, NLM_F_REQUEST, 0, queue);
    n = put_attr(b, n, A_VERDICT_HDR, vh, sizeof vh);
    finish(b, n);
    o->len += n;
}

static void config_request(int queue, const char *attrs, size_t alen) {
    char b[256], r[8192];
    size_t n = put_head(b, MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, ++seq, queue);
    memcpy(b + n, attrs, alen);
    finish(b, n + alen);
    if (send(nl, b, n + alen, 0) < 0) die_json("NFQUEUE config for queue %d: send: %s", queue, strerror(errno));
    for (;;) { /* packets may already be arriving on other queues: skip them */
        ssize_t got = recv(nl, r, sizeof r, 0);
        if (got < 0) {
            if (errno == EINTR || errno == ENOBUFS) continue;
            die_json("NFQUEUE config for queue %d: no answer: %s", queue, strerror(errno));
        }
        for (size_t off = 0; off + 16 <= (size_t)got;) {
            struct nlmsghdr h;
            memcpy(&h, r + off, sizeof h);
            if (h.nlmsg_type == NLMSG_ERROR && h.nlmsg_seq == seq && off + 20 <= (size_t)got) {
                int32_t err;
                memcpy(&err, r + off + 16, 4);
                if (err) die_json("NfQueueError: NFQUEUE config for queue %d refused: %s", queue, strerror(-err));
                return;
            }
            off += h.nlmsg_len < 16 ? 16 : NLMSG_ALIGN(h.nlmsg_len);
        }
    }
}

static size_t put_cmd(char *b, size_t off, uint8_t command) { /* nfqnl_msg_config_cmd: command, pad, pf */
    uint8_t cmd[4] = { command, 0, 0, 0 };
    uint16_t pf = htons(AF_INET);
    memcpy(cmd + 2, &pf, 2);
    return put_attr(b, off, CFG_CMD, cmd, 4);
}

static void bind_queue(int queue, uint32_t copy_range, uint32_t maxlen, int gso) {
    char a[128];
    size_t n;
    config_request(queue, a, put_cmd(a, 0, CMD_BIND));
    uint8_t params[5];
    uint32_t v = htonl(copy_range);
    memcpy(params, &v, 4);
    params[4] = COPY_PACKET;
    n = put_attr(a, 0, CFG_PARAMS, params, 5);
    v = htonl(maxlen);
    n = put_attr(a, n, CFG_QUEUE_MAXLEN, &v, 4);
    config_request(queue, a, n);
    uint32_t flags = htonl(gso ? F_GSO : 0), mask = htonl(F_GSO);
    n = put_attr(a, 0, CFG_FLAGS, &flags, 4);
    n = put_attr(a, n, CFG_MASK, &mask, 4);
    config_request(queue, a, n);
}

static void unbind_all(void) {
    for (int i = 0; i < ndirs; i++) {
        char b[64];
        size_t n = put_cmd(b, put_head(b, MSG_CONFIG, NLM_F_REQUEST, 0, dirs[i].queue), CMD_UNBIND);
        finish(b, n);
        (void)!send(nl, b, n, 0);
    }
}

static dir_t *dir_of_queue(int queue) {
    for (int i = 0; i < ndirs; i++) if (dirs[i].queue == queue) return &dirs[i];
    return NULL;
}

/* One notification datagram: every packet message in it -> model decision (under mu). Trusts no length. */
static void on_datagram(const unsigned char *buf, size_t n, double now, outbuf *o, int *filled) {
    size_t off = 0;
    while (off + 20 <= n) {
        struct nlmsghdr h;
        memcpy(&h, buf + off, sizeof h);
        if (h.nlmsg_len < 16 || h.nlmsg_len > n - off) return;
        if (h.nlmsg_type == MSG_PACKET && h.nlmsg_len >= 20) {
            int queue = buf[off + 18] << 8 | buf[off + 19];
            long long id = -1, length = -1, caplen = -1;
            size_t a = off + 20, end = off + h.nlmsg_len;
            while (a + 4 <= end) {
                struct nlattr at;
                memcpy(&at, buf + a, sizeof at);
                if (at.nla_len < 4 || at.nla_len > end - a) break;
                int type = at.nla_type & NLA_TYPE_MASK;
                uint32_t be;
                if (type == A_PACKET_HDR && at.nla_len >= 8) { memcpy(&be, buf + a + 4, 4); id = ntohl(be); }
                else if (type == A_CAP_LEN && at.nla_len >= 8) { memcpy(&be, buf + a + 4, 4); caplen = ntohl(be); }
                else if (type == A_PAYLOAD) length = at.nla_len - 4;
                a += NLA_ALIGN(at.nla_len);
            }
            if (id >= 0) {
                unsigned size = (unsigned)(caplen >= 0 ? caplen : (length > 0 ? length : 0));
                dir_t *d = dir_of_queue(queue);
                if (!d) add_verdict(o, queue, (uint32_t)id, 1, 0);
                else {
                    double release = arrive(d, now, size);
                    if (release < 0) add_verdict(o, queue, (uint32_t)id, 0, 0);
                    else { *filled |= !d->len; fifo_push(d, release, (uint32_t)id); }
                }
            }
        }
        off += NLMSG_ALIGN(h.nlmsg_len);
    }
}

/* The reader thread: stamps each notification as soon as it is read, whatever the releaser is doing
 * (a batch verdict runs the forwarding and the receiving stacks in the releaser's system call). */
static void *reader(void *arg) {
    static unsigned char rbuf[RECV_BATCH][RECV_BUF];
    static struct mmsghdr msgs[RECV_BATCH];
    static struct iovec iov[RECV_BATCH];
    static outbuf o;
    (void)arg;
    for (;;) {
        for (int i = 0; i < RECV_BATCH; i++) {
            iov[i] = (struct iovec){ rbuf[i], RECV_BUF };
            msgs[i].msg_hdr = (struct msghdr){ .msg_iov = &iov[i], .msg_iovlen = 1 };
        }
        int got = recvmmsg(nl, msgs, RECV_BATCH, MSG_WAITFORONE, NULL); /* blocks for the first only */
        if (got < 0 && errno != EINTR && errno != ENOBUFS && errno != EAGAIN) { /* ENOBUFS: notifications lost */
            fprintf(stderr, "wanemu: reading notifications: %s\n", strerror(errno));
            exit(1); /* the parent's next control line reports it */
        }
        if (got <= 0) continue;
        double now = mono();
        int filled = 0;
        pthread_mutex_lock(&mu);
        for (int i = 0; i < got; i++)
            on_datagram(rbuf[i], msgs[i].msg_len < RECV_BUF ? msgs[i].msg_len : RECV_BUF, now, &o, &filled);
        flush_out(&o); /* drops before unlocking: a later batch accept must not release a dropped id */
        pthread_mutex_unlock(&mu);
        uint64_t one = 1;
        if (filled) (void)!write(wake_fd, &one, sizeof one);
    }
    return NULL;
}

/* under mu: the batch verdict of each direction's due packets into o */
static void release_due(outbuf *o) {
    double now = mono() + SLACK;
    for (int i = 0; i < ndirs; i++) {
        dir_t *d = &dirs[i];
        long long last = -1;
        if (d->len && now - d->fifo[d->head].release > 1e-3 + SLACK) {
            double late = now - SLACK - d->fifo[d->head].release;
            late_releases++;
            late_5ms += late > 5e-3;
            if (late > late_max) late_max = late;
        }
        while (d->len && d->fifo[d->head].release <= now) {
            last = d->fifo[d->head].id;
            d->head = (d->head + 1) & (d->cap - 1);
            d->len--;
        }
        if (last >= 0) add_verdict(o, d->queue, (uint32_t)last, 1, 1);
    }
}

/* ------------------------------------------------------------------ control channel */
static void reply(const char *s) {
    size_t n = strlen(s), off = 0;
    while (off < n) {
        ssize_t w = write(1, s + off, n - off);
        if (w < 0) { if (errno == EINTR) continue; exit(0); } /* the parent went away */
        off += (size_t)w;
    }
}

static void stats_json(char *s, size_t cap) {
    char kernel[MAX_DIRS][160], name[200];
    FILE *f = fopen("/proc/net/netfilter/nfnetlink_queue", "r"); /* the kernel's own counters, per queue */
    unsigned long long q, portid, waiting, mode, range, qdrop, udrop, idseq;
    char line[256];
    for (int i = 0; i < ndirs; i++) strcpy(kernel[i], "{}");
    while (f && fgets(line, sizeof line, f))
        for (int i = 0; i < ndirs; i++)
            if (sscanf(line, "%llu %llu %llu %llu %llu %llu %llu %llu", &q, &portid, &waiting, &mode, &range, &qdrop,
                       &udrop, &idseq) == 8 && q == (unsigned long long)dirs[i].queue)
                snprintf(kernel[i], sizeof kernel[i], "{\"waiting\": %llu, \"queue_dropped\": %llu, "
                         "\"user_dropped\": %llu, \"id_sequence\": %llu}", waiting, qdrop, udrop, idseq);
    if (f) fclose(f);
    pthread_mutex_lock(&mu);
    size_t n = snprintf(s, cap, "{\"ok\": true, \"stats\": {");
    for (int i = 0; i < ndirs && n < cap; i++) {
        dir_t *d = &dirs[i];
        dstats_t *t = &d->st;
        n += snprintf(s + n, cap - n, "\"%s\": {\"packets_in\": %llu, \"bytes_in\": %llu, \"random_drops\": %llu, "
                      "\"queue_drops\": %llu, \"packets_out\": %llu, \"bytes_out\": %llu, \"max_backlog_bytes\": %llu, "
                      "\"held\": %zu, \"kernel\": %s}, ", jesc(d->name, name, sizeof name), t->packets_in, t->bytes_in, t->random_drops,
                      t->queue_drops, t->packets_out, t->bytes_out, t->max_backlog, d->len, kernel[i]);
    }
    if (n < cap)
        snprintf(s + n, cap - n, "\"turns\": %llu, \"late_max_ms\": %.3f, \"late_releases\": %llu, \"late_5ms\": "
                 "%llu, \"backend\": \"c\"}}\n", turns, late_max * 1e3, late_releases, late_5ms);
    pthread_mutex_unlock(&mu);
}

/* one command line -> one reply line; returns 1 on stop */
static int handle(const char *line, size_t len) {
    jpair v[32];
    const char *err = NULL;
    char r[16384], esc[400]; /* stats of MAX_DIRS directions fit */
    int n = jparse(line, len, v, 32, &err);
    if (n < 0) { snprintf(r, sizeof r, "{\"ok\": false, \"error\": \"ValueError: %s\"}\n", err); reply(r); return 0; }
    const jpair *op = jget(v, n, "op");
    const char *ops = op && op->type == J_STR ? op->str : "";
    if (!strcmp(ops, "stats")) { stats_json(r, sizeof r); reply(r); return 0; }
    if (!strcmp(ops, "stop")) { reply("{\"ok\": true, \"stop\": true}\n"); return 1; }
    if (strcmp(ops, "update")) { snprintf(r, sizeof r, "{\"ok\": false, \"error\": \"unknown op '%s'\"}\n", jesc(ops, esc, sizeof esc)); reply(r); return 0; }
    const jpair *w = jget(v, n, "direction");
    const char *which = w && w->type == J_STR ? w->str : "both";
    static const char *fields[4] = { "rate_bps", "delay", "loss", "queue_bytes" };
    int targets = 0;
    for (int i = 0; i < ndirs; i++) {
        if (strcmp(which, "both") && strcmp(which, dirs[i].name)) continue;
        targets++;
        spec_t s = dirs[i].spec;
        double *slot[4] = { &s.rate_bps, &s.delay, &s.loss, &s.queue_bytes };
        for (int k = 0; k < 4; k++) {
            const jpair *p = jget(v, n, fields[k]);
            if (p && p->type == J_NUM) *slot[k] = p->num;
            else if (p && p->type != J_NULL) { snprintf(r, sizeof r, "{\"ok\": false, \"error\": \"TypeError: %s\"}\n", fields[k]); reply(r); return 0; }
        }
        if ((err = spec_check(&s))) { snprintf(r, sizeof r, "{\"ok\": false, \"error\": \"ValueError: %s\"}\n", err); reply(r); return 0; }
    }
    if (!targets) { snprintf(r, sizeof r, "{\"ok\": false, \"error\": \"no direction '%s'\"}\n", jesc(which, esc, sizeof esc)); reply(r); return 0; }
    pthread_mutex_lock(&mu);
    double now = mono();
    for (int i = 0; i < ndirs; i++) { /* every target checked: apply to all or none */
        if (strcmp(which, "both") && strcmp(which, dirs[i].name)) continue;
        const jpair *rate = jget(v, n, fields[0]);
        if (rate && rate->type == J_NUM) rerate(&dirs[i], now, rate->num); /* (with the delay they were held at) */
        double *slot[3] = { &dirs[i].spec.delay, &dirs[i].spec.loss, &dirs[i].spec.queue_bytes };
        for (int k = 1; k < 4; k++) {
            const jpair *p = jget(v, n, fields[k]);
            if (p && p->type == J_NUM) *slot[k - 1] = p->num;
        }
    }
    pthread_mutex_unlock(&mu);
    reply("{\"ok\": true}\n");
    return 0;
}

/* ------------------------------------------------------------------ setup and loop */
static void configure(const char *json) {
    jpair v[128];
    const char *err = NULL;
    int n = jparse(json, strlen(json), v, 128, &err);
    if (n < 0) die_json("ValueError: config: %s", err);
    for (int i = 0; i < n; i++) { /* directions.<name>.queue names a direction */
        const char *k = v[i].key, *dot;
        if (strncmp(k, "directions.", 11) || !(dot = strchr(k + 11, '.')) || strcmp(dot, ".queue")) continue;
        if (ndirs == MAX_DIRS) die_json("ValueError: more than %d directions", MAX_DIRS);
        if ((size_t)(dot - k - 11) >= sizeof dirs[0].name) die_json("ValueError: direction name too long");
        dir_t *d = &dirs[ndirs++];
        memcpy(d->name, k + 11, (size_t)(dot - k - 11));
        char key[128];
#define FIELD(f, dflt) (snprintf(key, sizeof key, "directions.%s." f, d->name), jnum(v, n, key, dflt))
        d->queue = (int)v[i].num;
        d->spec = (spec_t){ FIELD("rate_bps", NAN), FIELD("delay", NAN), FIELD("loss", 0.0), FIELD("queue_bytes", NAN),
                            FIELD("loss_mtu", 0.0) };
        d->spec.queue_bytes = floor(d->spec.queue_bytes); /* int() in emulator.py */
        if ((err = spec_check(&d->spec))) die_json("ValueError: %s", err);
        if (d->queue < 0 || d->queue > 65535) die_json("ValueError: queue %d out of range", d->queue);
    }
    if (!ndirs) die_json("KeyError: 'directions'");
    const jpair *seed = jget(v, n, "seed");
    rng_state = seed && seed->type == J_NUM ? (uint64_t)(int64_t)seed->num : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    if (jnum(v, n, "realtime", 0)) {
        struct sched_param sp = { .sched_priority = 10 };
        if (sched_setscheduler(0, SCHED_FIFO, &sp))
            fprintf(stderr, "emulator: realtime priority refused (%s); running as a normal process\n", strerror(errno));
    }
    nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, 12 /* NETLINK_NETFILTER */);
    if (nl < 0) die_json("OSError: netlink socket: %s", strerror(errno));
    struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
    if (bind(nl, (struct sockaddr *)&sa, sizeof sa)) die_json("OSError: netlink bind: %s", strerror(errno));
    int rcvbuf = 32 << 20, one = 1;
    if (setsockopt(nl, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf))
        setsockopt(nl, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    setsockopt(nl, SOL_NETLINK_, NETLINK_NO_ENOBUFS_, &one, sizeof one);
    struct timeval tv = { .tv_sec = 5 }; /* a config answer never takes this long */
    setsockopt(nl, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    for (int i = 0; i < ndirs; i++)
        bind_queue(dirs[i].queue, (uint32_t)jnum(v, n, "copy_range", 40), (uint32_t)jnum(v, n, "maxlen", 1 << 16),
                   jnum(v, n, "gso", 0) != 0);
    tv.tv_sec = 0; /* the reader blocks until packets come */
    setsockopt(nl, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if ((wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) die_json("OSError: eventfd: %s", strerror(errno));
    pthread_t t; /* inherits SCHED_FIFO when granted */
    if ((errno = pthread_create(&t, NULL, reader, NULL))) die_json("OSError: reader thread: %s", strerror(errno));
}

static double next_due(void) {
    double due = -1;
    for (int i = 0; i < ndirs; i++)
        if (dirs[i].len && (due < 0 || dirs[i].fifo[dirs[i].head].release < due)) due = dirs[i].fifo[dirs[i].head].release;
    return due;
}

/* The releaser (main thread): sleeps until the next release is due (or the reader filled an empty FIFO,
 * or a control line came), releases every due packet with one batch verdict per direction, answers control. */
static void run(void) {
    static char ctl[1 << 16];
    static outbuf o;
    size_t ctl_len = 0;
    for (;;) {
        pthread_mutex_lock(&mu);
        double due = next_due(), wait = IDLE_WAIT;
        pthread_mutex_unlock(&mu);
        if (due >= 0) { wait = due - mono(); if (wait < 0) wait = 0; }
        struct pollfd fds[2] = { { .fd = wake_fd, .events = POLLIN }, { .fd = 0, .events = POLLIN } };
        struct timespec ts = { (time_t)wait, (long)((wait - (time_t)wait) * 1e9) };
        int ready = ppoll(fds, 2, &ts, NULL);
        if (ready < 0 && errno != EINTR) { perror("wanemu: ppoll"); return; }
        uint64_t woken;
        if (ready > 0 && fds[0].revents) (void)!read(wake_fd, &woken, sizeof woken);
        pthread_mutex_lock(&mu);
        turns++;
        release_due(&o);
        pthread_mutex_unlock(&mu);
        flush_out(&o); /* outside the lock: this runs the forwarding, the reader keeps stamping meanwhile */
        if (ready > 0 && fds[1].revents) {
            ssize_t got = read(0, ctl + ctl_len, sizeof ctl - ctl_len);
            if (got <= 0) { if (got < 0 && errno == EINTR) continue; return; } /* the parent went away */
            ctl_len += (size_t)got;
            char *nlp;
            while ((nlp = memchr(ctl, '\n', ctl_len))) {
                size_t len = (size_t)(nlp - ctl);
                int stop = handle(ctl, len);
                memmove(ctl, nlp + 1, ctl_len - len - 1);
                ctl_len -= len + 1;
                if (stop) return;
            }
            if (ctl_len == sizeof ctl) { reply("{\"ok\": false, \"error\": \"ValueError: line too long\"}\n"); ctl_len = 0; }
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 2) die_json("usage: wanemu CONFIG_JSON");
    configure(argv[1]);
    char r[96];
    snprintf(r, sizeof r, "{\"ok\": true, \"ready\": true, \"pid\": %d}\n", (int)getpid());
    reply(r);
    run();
    unbind_all(); /* the reader thread ends with the process */
    return 0;
}
