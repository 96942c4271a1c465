/* wanemu_link.h: the link model of wanemu.c, exactly linkmodel.py's LinkDirection (included by wanemu.c: one
 * translation unit).
 *
 * Owns: a direction's spec, counters and FIFO of (release time, packet id); Bernoulli loss from a seeded
 * splitmix64 (per wire packet with loss_mtu), a drop-tail queue in bytes before a serialiser at the bottleneck rate, a fixed one-way delay.
 * Must not know: netlink, threads and locks (the caller holds its lock), the control channel.
 */
#ifndef WANEMU_LINK_H
#define WANEMU_LINK_H
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* ------------------------------------------------------------------ link model (linkmodel.py) */
/* loss_mtu > 0: loss is per wire packet of at most that many bytes, and a GSO super-packet (the emulator bound with
 * the GSO flag) is dropped whole with the chance that any of the wire packets it stands for would be */
typedef struct { double rate_bps, delay, loss, queue_bytes, loss_mtu; } spec_t;
#define WIRE_HEADERS 52 /* IPv4 + TCP with timestamps: what each wire packet of a super-packet repeats */
typedef struct {
    unsigned long long packets_in, bytes_in, random_drops, queue_drops, packets_out, bytes_out, max_backlog;
} dstats_t;
typedef struct { double release; uint32_t id; } held_t;
typedef struct {
    char name[32];
    int queue;
    spec_t spec;
    dstats_t st;
    double free_at;               /* when the serialiser finishes the last accepted packet */
    held_t *fifo;                 /* ring buffer, capacity a power of two */
    size_t cap, head, len;
} dir_t;

static uint64_t rng_state;
static double rng_uniform(void) { /* splitmix64 -> [0, 1) */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return (double)((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
}

static const char *spec_check(const spec_t *s) {
    if (!(s->rate_bps > 0)) return "rate must be positive";
    if (!(s->delay >= 0)) return "delay must be >= 0";
    if (!(s->loss >= 0 && s->loss < 1)) return "loss must be in [0, 1)";
    if (!(s->queue_bytes > 0)) return "queue_bytes must be positive";
    if (!(s->loss_mtu == 0 || s->loss_mtu > WIRE_HEADERS)) return "loss_mtu must be 0 or above the headers";
    return NULL;
}

/* the chance that a packet of size bytes is lost (linkmodel.py's loss_chance) */
static double loss_chance(const spec_t *s, unsigned size) {
    if (s->loss_mtu <= 0 || size <= s->loss_mtu) return s->loss;
    unsigned per = (unsigned)s->loss_mtu - WIRE_HEADERS, n = (size - WIRE_HEADERS + per - 1) / per; /* wire packets */
    double keep = 1.0;
    for (unsigned i = 0; i < n; i++) keep *= 1.0 - s->loss;
    return 1.0 - keep;
}

/* the release time, or -1 to drop */
static double arrive(dir_t *d, double now, unsigned size) {
    d->st.packets_in++;
    d->st.bytes_in += size;
    if (d->spec.loss > 0 && rng_uniform() < loss_chance(&d->spec, size)) { d->st.random_drops++; return -1; }
    double backlog = d->free_at > now ? (d->free_at - now) * d->spec.rate_bps / 8 : 0.0;
    if (backlog + size > d->spec.queue_bytes) { d->st.queue_drops++; return -1; }
    d->free_at = (now > d->free_at ? now : d->free_at) + size * 8.0 / d->spec.rate_bps;
    d->st.packets_out++;
    d->st.bytes_out += size;
    if ((unsigned long long)(backlog + size) > d->st.max_backlog) d->st.max_backlog = (unsigned long long)(backlog + size);
    return d->free_at + d->spec.delay;
}

/* under mu: a new rate at now applies to the queue too (linkmodel.py's update and requeued): what is still
 * ahead of the serialiser leaves at the new rate; packets already serialised keep their release times */
static void rerate(dir_t *d, double now, double rate_bps) {
    double scale = d->spec.rate_bps / rate_bps;
    if (scale == 1.0) return;
    if (d->free_at > now) d->free_at = now + (d->free_at - now) * scale;
    for (size_t i = 0; i < d->len; i++) {
        held_t *h = &d->fifo[(d->head + i) & (d->cap - 1)];
        double depart = h->release - d->spec.delay;
        if (depart > now) h->release = now + (depart - now) * scale + d->spec.delay;
    }
    d->spec.rate_bps = rate_bps;
}

static void fifo_push(dir_t *d, double release, uint32_t id) {
    if (d->len == d->cap) {
        size_t ncap = d->cap ? d->cap * 2 : 1 << 16;
        held_t *n = malloc(ncap * sizeof *n);
        if (!n) { perror("wanemu: malloc"); exit(1); }
        for (size_t i = 0; i < d->len; i++) n[i] = d->fifo[(d->head + i) & (d->cap - 1)];
        free(d->fifo);
        d->fifo = n; d->cap = ncap; d->head = 0;
    }
    d->fifo[(d->head + d->len) & (d->cap - 1)] = (held_t){ release, id };
    d->len++;
}

#endif
