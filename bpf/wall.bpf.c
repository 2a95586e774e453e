/* Wall profile: where threads spend elapsed time, on-CPU and off-CPU.
 *
 * On-CPU: a perf cpu-clock sample at a fixed frequency, like the CPU profile, for target
 * processes only (value = the period), gives the stacks; how long each thread ran is measured
 * exactly from sched_switch and the samples (ON_CPU_TIME_LABEL, below). Sample counts alone
 * are 99 Hz counts of short bursts: a thread 1 ms on / 4 ms asleep gets ~16 samples a second,
 * and counts of that size were up to 30 % off per thread, moving its busy share by 4 - 6 points.
 * Off-CPU: everything happens at sched_switch, in the outgoing thread's context (`current`),
 * with its state in task-local storage (no hash map keyed by thread id):
 * - a per-CPU slot remembers which thread was switched in on this CPU and when; the next
 *   switch on this CPU switches that thread out again, so the thread then learns when its
 *   previous off-CPU interval ended and adds it to its (pid, tid, stack, state) aggregate.
 *   (An interval is therefore recorded when the thread next switches out, at the latest when
 *   it exits; its sample is stamped with the interval's start.)
 * - then it opens its next interval: switch-out time, task state, and its stack if this
 *   switch-out is captured (bpf/event_capture.h: probability p x q, per-thread rate and
 *   per-CPU budget; the stack capture is most of the program's cost).
 * Blocks shorter than MIN_BLOCK_NS are summed per thread without a stack (label
 * SHORT_OFF_CPU_LABEL), first in the thread's storage together with its on-CPU spans: both
 * reach the map at the thread's next on-CPU sample, at its first switch-out PENDING_FLUSH_NS
 * after the first of them, at its exit, or when its process is deselected, so most
 * switch-outs closing a short block make no map update. (A thread that blocks for long right
 * after has its last short blocks and on-CPU spans, less than PENDING_FLUSH_NS of them
 * reported when it next switches out, in a later window.) Long blocks whose
 * switch-out was not captured are summed per (thread, task state) under UNCAPTURED_LABEL |
 * state, and the agent shares them out over that thread and state's captured stacks by their
 * inverse-probability weights (agent/actors/aggregated.py): per-thread and per-state totals
 * stay exact, the split between stacks is estimated without bias.
 * With LOCK_FROM_SWITCH (the lock profile on too) the switch-outs also give the lock profile's
 * futex waits (bpf/lock_from_switch.h).
 * Kernel threads (no user stack, found once per thread) and threads of processes nobody
 * selected are marked in their storage and cost one storage lookup per switch.
 * Labels: ON_CPU_LABEL for on-CPU samples, ON_CPU_TIME_LABEL for the per-thread sum of exact
 * on-CPU time (no stack: the agent shares it out over the thread's on-CPU samples of the same
 * window by their counts; a long block's update carries the span ending at the switch-out
 * that closes it, a pending flush the spans summed with the short blocks: agg_value's
 * on_cpu_* fields), SHORT_OFF_CPU_LABEL for the
 * per-thread sum of short blocks, else the task state at switch-out. A thread rescheduled on
 * its way back to user space (prev_state 0) is recorded without its kernel stack, which would
 * only show that return path.
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>
#define COUNTER_SLOTS WALL_COUNTER_SLOTS
#include "counters.h"
#include "stack_event.h"
#include "stack_agg.h"
#include "event_capture.h"
#include "targets.h"
#ifdef LOCK_FROM_SWITCH   /* lock waits from this program's switch-outs */
#include "lock_from_switch.h"
#endif
#ifdef NATIVE_UNWINDING   /* CFI unwinding for code without frame pointers */
#include "unwind.h"
#endif

#define ON_CPU_LABEL (1ULL << 63)
#define SHORT_OFF_CPU_LABEL ((1ULL << 63) | 1)
#define ON_CPU_TIME_LABEL ((1ULL << 63) | 2)
#define UNCAPTURED_LABEL ((1ULL << 63) | (1ULL << 62))   /* | the task state */
/* sched_switch's prev_state of a task that has exited (EXIT_DEAD, EXIT_ZOMBIE): no interval */
#define EXITED_STATES 0x30
#define TARGET_RECHECK_NS 1000000000ULL  /* selection re-checked per thread every second */
/* A thread's short blocks and on-CPU spans are summed in its storage and reach the map at its
 * first switch-out after the first of them was added this long ago, at its next on-CPU sample,
 * at its exit, or when its process is no longer selected: about one map update per busy thread
 * per PENDING_FLUSH_NS instead of one per switch-out. */
#ifndef PENDING_FLUSH_NS
#define PENDING_FLUSH_NS 10000000ULL
#endif

#define THREAD_TRACED 1
#define THREAD_KERNEL 2

/* Per thread, in task-local storage (freed by the kernel with the task). */
struct wall_thread {
    u64 out_ts;         /* switch-out time of the open off-CPU interval, 0: none open */
    u64 stack_id;       /* its stack, 0: not captured */
    u64 state;          /* prev_state at that switch-out */
    u64 inverse_p;      /* 1 / its capture probability (1/2^16ths), if captured */
    u64 last_capture;   /* time of the thread's last captured switch-out, 0: never */
    u64 checked_ts;     /* when the process selection was last checked */
    u32 tgid;
    u32 flags;          /* THREAD_TRACED, THREAD_KERNEL */
    u64 pending_since;  /* when the first of the pending sums was added, 0: nothing pending */
    struct event_sum short_blocks;  /* pending: short blocks not in the map yet */
    struct event_sum on_cpu;        /* pending: on-CPU spans not in the map yet */
#ifdef LOCK_FROM_SWITCH
    struct lock_switch_state lock;  /* its futex waits (bpf/lock_from_switch.h) */
#endif
};

/* The thread switched in on this CPU and when: the next switch here switches it out. Its
 * on-CPU time is recorded up to accounted_ts (the switch-in, then each on-CPU sample). */
struct switched_in {
    u32 tid;
    u32 _pad;
    u64 ts;
    u64 accounted_ts;
};

BPF_TASK_STORAGE(threads, struct wall_thread);
BPF_PERCPU_ARRAY(cpu_current, struct switched_in, 1);

/* The thread's pending sums into the map: under SHORT_OFF_CPU_LABEL carrying the on-CPU
 * spans, or under ON_CPU_TIME_LABEL when no short block is pending; with LOCK_FROM_SWITCH its
 * summed lock waits into the lock maps. What is pending when the program is detached is lost
 * with the storage (as the open off-CPU intervals are). */
static __always_inline void flush_pending(struct wall_thread *t, u32 tid)
{
    if (!t->pending_since)
        return;
#ifdef LOCK_FROM_SWITCH
    lock_flush(&t->lock, t->tgid, tid);
#endif
    struct agg_key key = {.pid = t->tgid, .tid = tid, .stack_id = 0, .label = SHORT_OFF_CPU_LABEL};
    if (t->short_blocks.count) {
        agg_add_sums(&key, &t->short_blocks, &t->on_cpu);
    } else if (t->on_cpu.count) {   /* (only lock waits may be pending) */
        key.label = ON_CPU_TIME_LABEL;
        agg_add_sums(&key, &t->on_cpu, 0);
    }
    __builtin_memset(&t->short_blocks, 0, sizeof(t->short_blocks));
    __builtin_memset(&t->on_cpu, 0, sizeof(t->on_cpu));
    t->pending_since = 0;
}

static __always_inline void flush_if_due(struct wall_thread *t, u32 tid, u64 now)
{
    if (t->pending_since && now - t->pending_since >= PENDING_FLUSH_NS)
        flush_pending(t, tid);
}

/* An event of `ns` that started at `ts` (a short block or an on-CPU span), added to one of
 * the thread's pending sums. */
static __always_inline void pend(struct wall_thread *t, struct event_sum *sum, u64 ns, u64 ts, u64 now)
{
    if (!t->pending_since)
        t->pending_since = now;
    event_sum_add(sum, ns, ts);
}

/* With native unwinding each event takes three programs, each within the verifier's budget:
 * stage 1 (below) captures the stacks and CPython frames into agg_scratch, stage 2 (slot 0)
 * unwinds the user stack from CFI tables, stage 3 (slot 1) hashes, stores and aggregates. A
 * failed tail call from stage 1 (no stage loaded) records the frame-pointer stack as stage 1
 * has it. Slots are set by the agent, one array per program type (the kernel binds an array
 * to the type of the programs that use it). */
BPF_PROG_ARRAY(on_cpu_stages, 2);
BPF_PROG_ARRAY(switch_out_stages, 2);

/* The current thread's on-CPU time since it was last accounted on this CPU (its switch-in or
 * its previous sample), added to its exact on-CPU sum; nothing if this CPU's slot does not know
 * it (switched in before the program was attached). Its pending sums go to the map with it, at
 * every sample: the agent replaces a window's samples of a thread by the thread's measured
 * on-CPU time of that window, so the time up to a sample must be in the sample's window (a
 * window holding samples without it keeps their count x period, and the time arriving later
 * would be counted twice). */
static __always_inline void account_on_cpu(struct switched_in *cpu, struct wall_thread *t, u32 tid, u64 now)
{
    if (cpu->tid != tid || !cpu->accounted_ts || now <= cpu->accounted_ts)
        return;
    pend(t, &t->on_cpu, now - cpu->accounted_ts, cpu->accounted_ts, now);
    cpu->accounted_ts = now;
    flush_pending(t, tid);
}

static __always_inline void record_on_cpu(struct stack_event *ev)
{
    record_captured(ev, ON_CPU_LABEL, SAMPLE_PERIOD_NS, WEIGHT_ONE, ev->ts_ns);
    count(WALL_ON_CPU_SAMPLES);
}

/* Stage 3 of a captured switch-out: the stack goes into the thread's open interval. */
static __always_inline void record_switch_out(struct stack_event *ev)
{
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct wall_thread *t = threads.task_storage_get(task, 0, 0);
    if (!t || t->out_ts != ev->ts_ns)
        return;
    t->stack_id = agg_store_stack(ev);
#ifdef LOCK_FROM_SWITCH
    if (t->lock.label)
        t->lock.stack_id = lock_store_user_stack(ev);
#endif
}

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if ((u32)pid_tgid == 0 || !is_target(pid_tgid >> 32))
        return 0;
    /* Threads sched_switch traces (not kernel threads, selected): their on-CPU time so far.
     * Before the stack capture, whose loops would multiply the verifier's paths through it. */
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct wall_thread *t = threads.task_storage_get(task, 0, 0);
    u32 zero = 0;
    struct switched_in *cpu = cpu_current.lookup(&zero);
    if (t && (t->flags & THREAD_TRACED) && cpu)
        account_on_cpu(cpu, t, (u32)pid_tgid, bpf_ktime_get_ns());
    struct stack_event *ev = capture_scratch();
    if (!ev)
        return 0;
    fill_stack_event(ctx, ev, pid_tgid);
    if (ev->user_len <= 0) /* kernel thread */
        return 0;
    ev->value = SAMPLE_PERIOD_NS;
    ev->aux = ON_CPU_LABEL;
    ev->kind = 0;
#ifdef NATIVE_UNWINDING
    on_cpu_stages.call(ctx, 0);
    count(WALL_UNWIND_TAIL_CALL_FAILED);
#endif
    record_on_cpu(ev);
    return 0;
}

#ifdef NATIVE_UNWINDING
int wall_on_cpu_unwind(struct bpf_perf_event_data *ctx)
{
    struct stack_event *ev = capture_scratch();
    if (!ev)
        return 0;
    unwind_user_stack(ctx, ev);
    on_cpu_stages.call(ctx, 1);
    count(WALL_RECORD_TAIL_CALL_FAILED);
    return 0;
}

int wall_on_cpu_record(struct bpf_perf_event_data *ctx)
{
    struct stack_event *ev = capture_scratch();
    if (ev)
        record_on_cpu(ev);
    return 0;
}

int wall_switch_out_unwind(void *ctx)
{
    struct stack_event *ev = capture_scratch();
    if (!ev)
        return 0;
    unwind_task_user_stack(ev);
    switch_out_stages.call(ctx, 1);
    return 0;   /* stage 3 not run: the interval stays open as not captured */
}

int wall_switch_out_record(void *ctx)
{
    struct stack_event *ev = capture_scratch();
    if (ev)
        record_switch_out(ev);
    return 0;
}
#endif

/* The storage of a thread seen for the first time: whether it is traced (a selected process,
 * not a kernel thread: a one-entry user stack read, task_struct offsets from this build's
 * headers cannot be trusted on the running kernel). */
static __always_inline struct wall_thread *new_thread(struct task_struct *task, void *ctx, u64 now)
{
    struct wall_thread *t = threads.task_storage_get(task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!t) {
        count(WALL_THREAD_STATE_UNAVAILABLE);
        return 0;
    }
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 user_ip = 0;
    t->tgid = pid_tgid >> 32;
    t->checked_ts = now;
    if (bpf_get_stack(ctx, &user_ip, sizeof(user_ip), BPF_F_USER_STACK) <= 0)
        t->flags = THREAD_KERNEL;
    else
        t->flags = is_target(t->tgid) ? THREAD_TRACED : 0;
    return t;
}

/* The thread's off-CPU interval that ended at `in_ts` with the on-CPU time that followed it
 * (`on_cpu_ns` from `on_cpu_ts`): a short one joins the thread's pending sums, a long one
 * goes to its aggregate carrying the on-CPU time (one map update for both). */
static __always_inline void close_interval(struct wall_thread *t, u32 tid, u64 in_ts, u64 on_cpu_ns, u64 on_cpu_ts,
                                           u64 now)
{
    u64 start = t->out_ts;
    u64 duration = in_ts - start;
#ifdef LOCK_FROM_SWITCH
    if (t->lock.label && lock_wait_ended(&t->lock, t->tgid, tid, t->inverse_p, start, duration) &&
        !t->pending_since)
        t->pending_since = now;     /* flushed with the thread's pending sums */
#endif
    if (duration < MIN_BLOCK_NS) {  /* summed per thread, without its stack */
        pend(t, &t->short_blocks, duration, start, now);
        if (on_cpu_ns)
            pend(t, &t->on_cpu, on_cpu_ns, on_cpu_ts, now);
    } else {
        u64 label = t->state;
        if (!t->stack_id) {     /* long but not captured: summed per thread and state */
            label |= UNCAPTURED_LABEL;
            count(WALL_UNCAPTURED_LONG);
        }
        record_event_carrying(t->tgid, tid, t->stack_id, label, duration, t->inverse_p, start, on_cpu_ns,
                              on_cpu_ts);
    }
    count(WALL_OFF_CPU_INTERVALS);
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u32 zero = 0;
    struct switched_in *cpu = cpu_current.lookup(&zero);
    if (!cpu)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u32 tid = args->prev_pid;       /* the outgoing thread, still current */
    u64 in_ts = cpu->tid == tid ? cpu->ts : 0;
    struct switched_in out = *cpu;   /* the outgoing thread's slot, for its on-CPU time */
    cpu->tid = args->next_pid;
    cpu->ts = now;
    cpu->accounted_ts = now;
    if (!tid)
        return 0;   /* idle */
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct wall_thread *t = threads.task_storage_get(task, 0, 0);
    if (!t) {
        t = new_thread(task, args, now);
        if (!t)
            return 0;
    }
    if (t->flags & THREAD_KERNEL)
        return 0;
#if TARGET_FILTER
    if (now - t->checked_ts > TARGET_RECHECK_NS) {
        t->checked_ts = now;
        t->flags = is_target(t->tgid) ? THREAD_TRACED : 0;
    }
#endif
    if (!(t->flags & THREAD_TRACED)) {
        flush_pending(t, tid);  /* its process is no longer selected */
        t->out_ts = 0;
        return 0;
    }
    /* The on-CPU time that ends now (the rest since its switch-in or last sample), carried
     * by the interval that ended when this thread was switched in here, else pending. */
    u64 on_cpu_ns = 0;
    if (out.tid == tid && out.accounted_ts && now > out.accounted_ts)
        on_cpu_ns = now - out.accounted_ts;
    if (t->out_ts) {
        if (in_ts > t->out_ts) {
            close_interval(t, tid, in_ts, on_cpu_ns, out.accounted_ts, now);
            on_cpu_ns = 0;
        } else {
            count(WALL_INTERVAL_END_UNSEEN);
        }
        t->out_ts = 0;
    }
    if (on_cpu_ns)
        pend(t, &t->on_cpu, on_cpu_ns, out.accounted_ts, now);
    u64 state = (u64)args->prev_state;
    if (state & EXITED_STATES) {
        flush_pending(t, tid);  /* its last switch-out */
        return 0;
    }
    flush_if_due(t, tid, now);
    /* The next one, from now on (its length is not known yet). */
    int certain = 0;
#ifdef LOCK_FROM_SWITCH
    t->lock.label = state == STATE_SLEEPING ? switch_out_futex_wait(task) : 0;
    t->lock.stack_id = 0;
    if ((state & BLOCKED_STATES) && t->lock.label != t->lock.pending_label)
        lock_flush(&t->lock, t->tgid, tid);     /* it may sleep long: not holding them back */
    certain = t->lock.label && lock_label_is_new(t->lock.recent, t->lock.label, now);
#endif
    u64 pi = capture_probability(&t->last_capture, now, 0, certain);
    t->out_ts = now;
    t->state = state;
    t->stack_id = 0;
    if (!pi) {
        count(WALL_NOT_CAPTURED);
        return 0;
    }
    t->inverse_p = inverse_probability(pi);
    struct stack_event *ev = capture_scratch();
    if (!ev)
        return 0;
    /* prev_state 0: runnable and not preempted in the kernel, i.e. rescheduled on its way back
     * to user space (a timer tick took its CPU). Its kernel stack is always that same return
     * path and costs half of the capture: left out. Preempted in the kernel (TASK_REPORT_MAX)
     * or blocked, the kernel stack says where. */
    fill_stack_event_parts(args, ev, ((u64)t->tgid << 32) | tid, state != 0);
    if (ev->user_len <= 0)  /* no user stack (the thread is exiting): not captured */
        return 0;
    ev->ts_ns = now;
    ev->aux = state;
    ev->kind = 1;
    ev->value = pi;
#ifdef NATIVE_UNWINDING
    switch_out_stages.call(args, 0);
    count(WALL_UNWIND_TAIL_CALL_FAILED);
#endif
    record_switch_out(ev);
    return 0;
}
