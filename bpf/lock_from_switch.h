/* Lock waits taken from the wall program's switch-outs (LOCK_FROM_SWITCH: the wall and lock
 * profiles both on), instead of the lock program's futex system-call tracepoints
 * (bpf/lock.bpf.c), whose two programs ran at every futex call and, while enabled, put every
 * system call of the host on the kernel's slow path (docs/design/overhead.md, fifteenth round).
 *
 * A thread blocking in a futex wait is switched out inside the system call, asleep
 * (prev_state TASK_INTERRUPTIBLE). Its saved user registers (pt_regs, the hardware frame:
 * stable across kernel versions, unlike task_struct) give the system call number and the futex
 * arguments, so that switch-out knows the wait's label (bpf/futex_wait.h), and the off-CPU
 * interval it opens is the wait: it ends when the thread is switched in again and is recorded
 * when the wall program closes the interval. Waits shorter than LOCK_MIN_WAIT_NS are counted
 * only, as in the lock program. Short waits and long waits not captured are summed in the
 * thread's storage (the latter per lock, one lock at a time) and reach the maps and counters
 * with the wall program's pending sums (bpf/wall.bpf.c flush_pending), and whenever the
 * thread blocks on anything but that lock: a thread handing a mutex back and forth makes one
 * map update per flush instead of one per wait (a thread alternating between two locks, one
 * per wait).
 *
 * The waiting stack is the switch-out's user stack, the one the thread will return to from the
 * system call. When the wall's draw captures the switch-out, its stack is stored a second time
 * for the lock profile without the kernel part (lock stacks are user stacks, as the lock program
 * records them) and the wait carries the same inverse-probability weight; a wait not captured
 * adds its exact delay and count to (thread, stack id 0, label), shared out by the agent as in
 * the lock program. The rate and budget are the wall's. The draw is made when the wait starts,
 * so, unlike the lock program, it cannot take a long wait for certain by its length: instead a
 * thread's wait on a lock none of its last LOCK_RECENT captured long waits (within
 * LOCK_RECENT_NS) was on is drawn for certain (with a budget, within its cap for such events), so that each (thread, lock)
 * the agent shares uncaptured waits over has a stack (a one-off wait, a join, drawn at the
 * budget's factor would mostly be left stackless).
 *
 * What differs from the tracepoints: a wait that never sleeps (the futex word had changed, the
 * wake came first) is not seen at all, where the tracepoints counted it as a short wait; a
 * wait's delay is its time off CPU, from the switch-out to the switch-in (the system call's
 * entry and exit, a few microseconds, are left out); a wait woken without a futex wake (a
 * spurious wake-up) that sleeps again inside the same call counts as two waits on the same lock.
 */
#ifndef STACKFLEET_LOCK_FROM_SWITCH_H
#define STACKFLEET_LOCK_FROM_SWITCH_H

#include "futex_wait.h"
#include "lock_maps.h"

#ifndef LOCK_MIN_WAIT_NS
#define LOCK_MIN_WAIT_NS 10000ULL
#endif
#define SYS_FUTEX 202               /* the x86-64 system call number of futex(2) */
#define LOCK_RECENT 4               /* a power of two */
/* How long a captured wait's stack stands in for the same thread and lock's later waits: the
 * agent's EARLIER_MAX_AGE_S (agent/actors/aggregated.py). */
#define LOCK_RECENT_NS 60000000000ULL
#define STATE_SLEEPING 1            /* sched_switch's prev_state for TASK_INTERRUPTIBLE */
#define BLOCKED_STATES 0xff         /* prev_state bits of a blocked task (0, 0x100: preempted) */

/* The label of the futex wait the outgoing thread (`task`, current) is blocking in; 0 if it is
 * not in one. The registers are read straight from the BTF-typed pointer the helper returns
 * (loads the verifier checks against the running kernel's BTF and guards against faults), not
 * with a probe-read call: this runs at every sleeping switch-out. futex(2)'s arguments are
 * (uaddr di, op si, val dx, timeout r10, uaddr2 r8, val3 r9). */
static __always_inline u64 switch_out_futex_wait(struct task_struct *task)
{
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
    if (!regs || regs->orig_ax != SYS_FUTEX)
        return 0;
    u32 op = (u32)regs->si;
    if (!futex_op_waits(op))
        return 0;
    return futex_wait_label(regs->di, op, (u32)regs->r9);
}

/* A thread's recently captured lock wait. */
struct lock_capture {
    u64 label;
    u64 ts;
};

/* A thread's lock state, in its wall storage. */
struct lock_switch_state {
    u64 label;          /* the open interval is a futex wait on this label, 0: not */
    u64 stack_id;       /* its user stack in the lock maps, 0: not captured */
    u64 pending_label;  /* the lock of `pending` */
    struct event_sum pending;       /* long waits not captured on pending_label, not in the maps yet */
    struct event_sum short_waits;   /* short waits, not counted yet */
    struct lock_capture recent[LOCK_RECENT];    /* its last captured waits */
};

/* 1 if none of the thread's recent captures was on this label: its wait is drawn for certain. */
static __always_inline int lock_label_is_new(struct lock_capture *recent, u64 label, u64 now)
{
    for (int i = 0; i < LOCK_RECENT; i++) {
        if (recent[i].label == label && now - recent[i].ts < LOCK_RECENT_NS)
            return 0;
    }
    return 1;
}

/* Remember a captured wait's label: in its own slot if there, else in the oldest. */
static __always_inline void lock_label_captured(struct lock_capture *recent, u64 label, u64 now)
{
    u32 slot = 0;
    u64 oldest = ~0ULL;
    for (int i = 0; i < LOCK_RECENT; i++) {
        if (recent[i].label == label) {
            slot = i;
            break;
        }
        if (recent[i].ts < oldest) {
            oldest = recent[i].ts;
            slot = i;
        }
    }
    recent[slot & (LOCK_RECENT - 1)].label = label;
    recent[slot & (LOCK_RECENT - 1)].ts = now;
}

static __always_inline void lock_count_add(u32 slot, u64 n)
{
    u64 *c = lock_counters.lookup(&slot);
    if (c)
        *c += n;
}

/* The lock maps' current generation's entry for this key, as bpf/stack_agg.h's agg_entry for a
 * program's own maps (bcc cannot rewrite map calls made through macros or pointers, so this is
 * the same few lines over the lock maps' names); 0 if the map is full (counted). */
static __always_inline struct agg_value *lock_agg_entry(struct agg_key *key, u64 first_ts, u64 lost_events,
                                                        u64 lost_ns)
{
    u32 zero = 0;
    u32 *gen = lock_agg_generation.lookup(&zero);
    struct agg_value init = {.first_ts = first_ts};
    struct agg_value *v;
    if (gen && (*gen & 1))
        v = lock_agg1.lookup_or_try_init(key, &init);
    else
        v = lock_agg0.lookup_or_try_init(key, &init);
    if (!v) {
        lock_count_add(AGG_MAP_FULL, lost_events);
        lock_count_add(AGG_MAP_FULL_NS, lost_ns);
    }
    return v;
}

/* A captured switch-out's stack, stored for the lock profile without its kernel part (the
 * wall's copy is stored already); its id. */
static __always_inline u64 lock_store_user_stack(struct stack_event *ev)
{
    ev->kernel_len = 0;
    ev->kernel[0] = 0;
    u64 id = agg_stack_id(ev);
    if (!lock_stacks.lookup(&id))
        lock_count_add(lock_stacks.update(&id, ev) == 0 ? AGG_STACKS_STORED : AGG_STACK_STORE_FAILED, 1);
    return id;
}

/* The thread's summed waits into the lock maps and counters. */
static __always_inline void lock_flush(struct lock_switch_state *l, u32 pid, u32 tid)
{
    u64 n = l->pending.count;
    if (n) {
        struct agg_key key = {.pid = pid, .tid = tid, .stack_id = 0, .label = l->pending_label};
        struct agg_value *v = lock_agg_entry(&key, l->pending.first_ts, n, l->pending.ns);
        if (v)
            agg_value_add_sum(v, &l->pending);
        lock_count_add(LOCK_WAITS, n);
        lock_count_add(LOCK_NOT_CAPTURED, n);
        lock_count_add(AGG_SAMPLED_OUT, n);
        __builtin_memset(&l->pending, 0, sizeof(l->pending));
    }
    n = l->short_waits.count;
    if (n) {
        lock_count_add(LOCK_WAITS, n);
        lock_count_add(LOCK_SHORT_WAITS, n);
        lock_count_add(LOCK_SHORT_WAIT_NS, l->short_waits.ns);
        __builtin_memset(&l->short_waits, 0, sizeof(l->short_waits));
    }
}

/* The wait a closed off-CPU interval was (`ns` from `start`), its stack (0: not captured) and
 * weight the switch-out's: a captured one into the lock maps now; others summed in the thread's
 * storage (returns 1: the caller flushes them with its own pending sums). */
static __always_inline int lock_wait_ended(struct lock_switch_state *l, u32 pid, u32 tid, u64 inverse_p, u64 start,
                                           u64 ns)
{
    if (ns < LOCK_MIN_WAIT_NS) {
        event_sum_add(&l->short_waits, ns, start);
        return 1;
    }
    if (l->stack_id) {
        lock_label_captured(l->recent, l->label, start);
        struct agg_key key = {.pid = pid, .tid = tid, .stack_id = l->stack_id, .label = l->label};
        struct agg_value *v = lock_agg_entry(&key, start, 1, ns);
        if (v)
            agg_value_add(v, ns, weighted_ns(ns, inverse_p), inverse_p, start);
        lock_count_add(LOCK_WAITS, 1);
        lock_count_add(AGG_CAPTURED, 1);
        return 0;
    }
    if (l->pending.count && l->pending_label != l->label)
        lock_flush(l, pid, tid);    /* one lock's waits at a time */
    l->pending_label = l->label;
    event_sum_add(&l->pending, ns, start);
    return 1;
}

#endif
