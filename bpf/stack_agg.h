/* In-kernel aggregation of stack events (wall and lock): instead of one ring-buffer record
 * per event, each event adds (count, ns) to an entry keyed by (pid, tid, stack id, label),
 * and the agent drains the entries once per flush interval.
 *
 * Stack ids: the full stack record (struct stack_event: both stacks, the user-stack copy
 * for frame recovery, CPython frames) is stored once in `stacks` under a 64-bit hash of
 * everything that decides the symbolized stack. The agent reads a stack the first time it
 * sees its id and caches the symbolized frames. `stacks` is an LRU map: no agent deletes
 * needed, old stacks age out; an id whose stack aged out before the agent read it is
 * counted by the agent (stack_missing), its values are kept.
 *
 * What the hash covers: the user and kernel return addresses, the CPython frames, and the
 * words of the stack copy that agent/stacks/scan.py could turn into recovered frames (the
 * ones below the first frame-pointer return address that follow a call instruction in the
 * process's memory). Other words of the copy (locals, counters, saved registers) are left
 * out so they do not split one stack into many. The call check here is looser than the
 * agent's (any readable memory, not only executable file mappings): at worst a stack gets
 * two ids, never two stacks one id.
 *
 * Double buffering: two aggregation maps; `agg_generation` says which one BPF writes.
 * The agent flips the generation, waits for programs already running to finish (they run
 * for microseconds), then reads and deletes the other map in one batch. Every update lands
 * in a map the agent has not read yet, so no count is lost between read and delete.
 * A full map is counted (AGG_MAP_FULL, AGG_MAP_FULL_NS: events and ns that found no free entry).
 *
 * Events whose stack was not captured (bpf/event_capture.h) are added with stack id 0 (or a
 * label of their own) and no weights; captured ones add their inverse-probability weights.
 * The agent's side of agg_key/agg_value is agent/bpf/layouts.py, checked at load.
 */
#ifndef STACKFLEET_STACK_AGG_H
#define STACKFLEET_STACK_AGG_H

#ifndef AGG_LAYOUTS_ONLY   /* bpf/lock_maps.bpf.c: the key and value layouts, no maps */
#include "counters.h"   /* the program's counters start with enum agg_counter's slots */
#endif

#ifndef AGG_ENTRIES
#define AGG_ENTRIES 16384
#endif
#ifndef STACK_ENTRIES
#define STACK_ENTRIES 4096
#endif
#define AGG_CALL_CHECKS 16        /* call-site reads per stack copy, bounding the cost */

struct agg_key {
    u32 pid;
    u32 tid;
    u64 stack_id;
    u64 label;          /* type-specific: task state (wall), lock address (lock) */
};

struct agg_value {
    u64 count;
    u64 total_ns;
    u64 first_ts;       /* CLOCK_MONOTONIC of the first event in this flush window */
    u64 last_ts;
    u32 cpu;            /* CPU of the latest event (for the sample's cpu field) */
    u32 on_cpu_count;   /* wall: the thread's on-CPU spans carried by this entry's updates */
    u64 weighted_ns;    /* captured events: sum of ns / (probability the event was captured);
                           0 for the per-(thread, label) sums of events not captured */
    u64 weighted_count; /* captured events: sum of 1 / that probability, in 1/2^16ths */
    /* wall: the thread's exact on-CPU spans carried by this entry's updates (a long block's
     * update carries the span ending at its switch-out; a flush of the thread's pending sums,
     * the spans summed with its short blocks: bpf/wall.bpf.c), their count, ns and the first
     * and last span's start; 0 in other entries and programs. The agent adds them to the
     * thread's on-CPU time of the same window. */
    u64 on_cpu_ns;
    u64 on_cpu_first_ts;
    u64 on_cpu_last_ts;
};

#ifndef AGG_LAYOUTS_ONLY
BPF_HASH(agg0, struct agg_key, struct agg_value, AGG_ENTRIES);
BPF_HASH(agg1, struct agg_key, struct agg_value, AGG_ENTRIES);
BPF_ARRAY(agg_generation, u32, 1);
BPF_TABLE("lru_hash", u64, struct stack_event, stacks, STACK_ENTRIES);
BPF_PERCPU_ARRAY(agg_scratch, struct stack_event, 1);

static __always_inline u64 agg_mix(u64 h, u64 w)
{
    h ^= w;
    h *= 0x9E3779B97F4A7C15ULL;
    return h ^ (h >> 31);
}

/* True if the 8 bytes ending at a candidate return address end with an x86-64 call:
 * E8 rel32, or FF /2 with a ModRM form whose length matches (see agent/stacks/scan.py). */
static __always_inline int agg_call_form(const u8 *c, int len)
{
    if (c[8 - len] != 0xFF)
        return 0;
    u8 m = c[9 - len];
    u8 mod = m >> 6, reg = (m >> 3) & 7, rm = m & 7;
    if (reg != 2)
        return 0;
    int size = 2 + ((rm == 4 && mod != 3) ? 1 : 0);
    if (mod == 0)
        size += rm == 5 ? 4 : 0;
    else if (mod == 1)
        size += 1;
    else if (mod == 2)
        size += 4;
    return size == len;
}

static __always_inline int agg_follows_call(u64 address)
{
    u8 c[8] = {};
    if (bpf_probe_read_user(c, sizeof(c), (void *)(address - 8)) != 0)
        return 0;
    if (c[3] == 0xE8)
        return 1;
    return agg_call_form(c, 2) || agg_call_form(c, 3) || agg_call_form(c, 4) ||
           agg_call_form(c, 6) || agg_call_form(c, 7);
}

/* The stack id of a filled event: 0 is never returned (it means "no stack"). */
static __always_inline u64 agg_stack_id(struct stack_event *ev)
{
    u64 h = agg_mix(0xcbf29ce484222325ULL, ev->pid);
    /* bpf_get_stack zero-fills the rest of its buffer, and 0 is never a return address. */
    for (int i = 0; i < MAX_STACK_DEPTH; i++) {
        u64 w = ev->user[i];
        if (!w)
            break;
        h = agg_mix(h, w);
    }
    h = agg_mix(h, 0);
    for (int i = 0; i < MAX_STACK_DEPTH; i++) {
        u64 w = ev->kernel[i];
        if (!w)
            break;
        h = agg_mix(h, w);
    }
    h = agg_mix(h, 0);
    /* Candidate recovered frames: words below the slot of the first FP return address.
     * The call-check budget is counted in the event's padding (map memory), not in a
     * local: the verifier would track a local's every value and explore each separately. */
    u64 first_fp = ev->user_len >= 16 ? ev->user[1] : 0;
    u64 sp = ev->user_sp;
    ev->_pad = 0;
    for (int i = 0; i < STACK_COPY_BYTES / 8; i++) {
        if (!ev->copy_len)
            break;
        u64 w = *(u64 *)(ev->stack_copy + i * 8);
        if (first_fp && w == first_fp)
            break;
        if (w < 0x10000 || w >= 0x800000000000ULL || (w >= sp - 0x10000 && w < sp + 0x800000))
            continue;       /* not a user code address: null, small, kernel, or on the stack */
        if (ev->_pad >= AGG_CALL_CHECKS || agg_follows_call(w))
            h = agg_mix(h, w);  /* over budget the word is kept: at worst the stack splits */
        ev->_pad += 1;
    }
    ev->_pad = 0;
    u32 py = ev->py_count < PY_MAX_FRAMES ? ev->py_count : PY_MAX_FRAMES;
    for (int i = 0; i < PY_MAX_FRAMES; i++) {
        if (i >= py)
            break;
        h = agg_mix(h, ev->py[i].code);
        h = agg_mix(h, ev->py[i].instr ^ ((u64)ev->py[i].marker << 56));
    }
    h = agg_mix(h, ((u64)py << 32) | (u32)ev->py_status);
    return h ? h : 1;
}

/* Store the event's stack under its id unless it is there already; returns the id. */
static __always_inline u64 agg_store_stack(struct stack_event *ev)
{
    u64 id = agg_stack_id(ev);
    if (!stacks.lookup(&id))
        count(stacks.update(&id, ev) == 0 ? AGG_STACKS_STORED : AGG_STACK_STORE_FAILED);
    return id;
}

/* One event of `ns` at `ts` added to an entry, with its weights (0: not captured). */
static __always_inline void agg_value_add(struct agg_value *v, u64 ns, u64 weighted, u64 weighted_count, u64 ts)
{
    __sync_fetch_and_add(&v->count, 1);
    __sync_fetch_and_add(&v->total_ns, ns);
    if (weighted_count) {
        __sync_fetch_and_add(&v->weighted_ns, weighted);
        __sync_fetch_and_add(&v->weighted_count, weighted_count);
    }
    if (ts < v->first_ts)
        v->first_ts = ts;
    if (ts > v->last_ts)
        v->last_ts = ts;
    v->cpu = bpf_get_smp_processor_id();
}

/* The current generation's entry for this key, made with `first_ts` if new; 0 if the map is
 * full (counted: the `lost_events` and `lost_ns` the caller was adding). */
static __always_inline struct agg_value *agg_entry(struct agg_key *key, u64 first_ts, u64 lost_events,
                                                   u64 lost_ns)
{
    u32 zero = 0;
    u32 *gen = agg_generation.lookup(&zero);
    struct agg_value init = {.first_ts = first_ts};
    struct agg_value *v;
    if (gen && (*gen & 1))
        v = agg1.lookup_or_try_init(key, &init);
    else
        v = agg0.lookup_or_try_init(key, &init);
    if (!v) {
        count_add(AGG_MAP_FULL, lost_events);
        count_add(AGG_MAP_FULL_NS, lost_ns);
    }
    return v;
}

/* Add one event of `ns` to the current generation's entry for this key, with its weights
 * (bpf/event_capture.h: ns and 1 divided by the probability it was captured; 0 if it was not),
 * and `on_cpu_ns` > 0 of on-CPU time that started at `on_cpu_ts` carried along (wall). */
static __always_inline void agg_add_carrying(struct agg_key *key, u64 ns, u64 weighted, u64 weighted_count,
                                             u64 ts, u64 on_cpu_ns, u64 on_cpu_ts)
{
    struct agg_value *v = agg_entry(key, ts, 1, ns + on_cpu_ns);
    if (!v)
        return;
    agg_value_add(v, ns, weighted, weighted_count, ts);
    if (on_cpu_ns) {
        __sync_fetch_and_add(&v->on_cpu_ns, on_cpu_ns);
        __sync_fetch_and_add(&v->on_cpu_count, 1);
        if (!v->on_cpu_first_ts || on_cpu_ts < v->on_cpu_first_ts)
            v->on_cpu_first_ts = on_cpu_ts;
        if (on_cpu_ts > v->on_cpu_last_ts)
            v->on_cpu_last_ts = on_cpu_ts;
    }
}

/* Events summed before they reach the map (wall: a thread's short blocks and on-CPU spans,
 * kept in its task storage): how many, their ns, and the first and last one's start. */
struct event_sum {
    u64 count;
    u64 ns;
    u64 first_ts;
    u64 last_ts;
};

static __always_inline void event_sum_add(struct event_sum *s, u64 ns, u64 ts)
{
    s->count++;
    s->ns += ns;
    if (!s->first_ts || ts < s->first_ts)
        s->first_ts = ts;
    if (ts > s->last_ts)
        s->last_ts = ts;
}

/* Summed events (not captured: no weights) added to an entry. */
static __always_inline void agg_value_add_sum(struct agg_value *v, const struct event_sum *s)
{
    __sync_fetch_and_add(&v->count, s->count);
    __sync_fetch_and_add(&v->total_ns, s->ns);
    if (s->first_ts < v->first_ts)
        v->first_ts = s->first_ts;
    if (s->last_ts > v->last_ts)
        v->last_ts = s->last_ts;
    v->cpu = bpf_get_smp_processor_id();
}

/* Add summed events (not captured: no weights) to the current generation's entry for this key,
 * with on-CPU spans (`on_cpu`, may be 0) carried along as in agg_add_carrying. */
static __always_inline void agg_add_sums(struct agg_key *key, const struct event_sum *s,
                                         const struct event_sum *on_cpu)
{
    u64 on_cpu_ns = on_cpu ? on_cpu->ns : 0;
    struct agg_value *v = agg_entry(key, s->first_ts, s->count, s->ns + on_cpu_ns);
    if (!v)
        return;
    agg_value_add_sum(v, s);
    if (on_cpu && on_cpu_ns) {
        __sync_fetch_and_add(&v->on_cpu_ns, on_cpu_ns);
        __sync_fetch_and_add(&v->on_cpu_count, (u32)on_cpu->count);
        if (!v->on_cpu_first_ts || on_cpu->first_ts < v->on_cpu_first_ts)
            v->on_cpu_first_ts = on_cpu->first_ts;
        if (on_cpu->last_ts > v->on_cpu_last_ts)
            v->on_cpu_last_ts = on_cpu->last_ts;
    }
}

#endif   /* AGG_LAYOUTS_ONLY */

#endif
