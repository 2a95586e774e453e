/* Wall profile: where threads spend elapsed time, on-CPU and off-CPU.
 *
 * On-CPU: a perf cpu-clock sample at a fixed frequency, like the CPU profile, for target
 * processes only (value = the period).
 * Off-CPU: at sched_switch the outgoing task (still `current`) gets its stacks stored
 * (bpf/stack_agg.h: once per distinct stack) and a small per-thread entry remembers the
 * stack id, the switch-out time and the task state; when the thread is switched back in,
 * the blocked duration is added to its (pid, tid, stack, state) aggregate. Blocks shorter
 * than MIN_BLOCK_NS are summed per thread without a stack (label SHORT_OFF_CPU_LABEL).
 * Nothing goes through a ring buffer: the agent drains the aggregates every flush.
 * Kernel threads (no user stack) are skipped: idle kthreads must not drown the profile.
 * Labels: ON_CPU_LABEL for on-CPU samples, SHORT_OFF_CPU_LABEL for the per-thread sum of
 * short blocks, else the task state at switch-out. A thread rescheduled on its way back to
 * user space (prev_state 0) is recorded without its kernel stack, which would only show
 * that return path.
 *
 * Capture sampling (CAPTURE_RATE_HZ > 0): the stack capture is most of this program's cost,
 * and a thread that switches out thousands of times a second would pay it every time. So a
 * switch-out takes its stack with probability p = min(1, t x CAPTURE_RATE_HZ), t being the
 * time since the thread's last captured switch-out: a thread switching out less often than
 * CAPTURE_RATE_HZ is captured every time, a faster one about CAPTURE_RATE_HZ times a second,
 * at random moments (no aliasing with a periodic thread). Every switch-out still records its
 * time, so each off-CPU interval's length is known exactly: short ones are summed per thread
 * as before; long ones not captured are summed per (thread, task state) under
 * UNCAPTURED_LABEL | state. A captured interval also adds its length divided by p (a
 * Horvitz-Thompson weight: p depends on the thread's recent history, e.g. the first
 * preemption after a long sleep always has p = 1, a sleep soon after a captured preemption a
 * small one) to its aggregate's weighted_ns. The agent (agent/actors/wall.py) shares each
 * (thread, state)'s exact off-CPU total out over its captured stacks in proportion to
 * weighted_ns: per-thread and per-state totals stay exact, the split between stacks is
 * estimated without the bias of treating every capture as equally likely.
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>
#include "stack_event.h"
#include "stack_agg.h"
#include "targets.h"

#define ON_CPU_LABEL (1ULL << 63)
#define SHORT_OFF_CPU_LABEL ((1ULL << 63) | 1)
#define UNCAPTURED_LABEL ((1ULL << 63) | (1ULL << 62))   /* | the task state */

#ifndef CAPTURE_RATE_HZ
#define CAPTURE_RATE_HZ 0
#endif
#define P_SHIFT 32
#define P_ONE (1ULL << P_SHIFT)     /* capture probability in 1/2^32ths */
#define WEIGHT_SHIFT 16             /* inverse probabilities in 1/2^16ths */

struct blocked_thread {
    u64 ts_ns;          /* switch-out time */
    u64 stack_id;       /* 0: the stack was not captured (sampled out) */
    u64 state;          /* prev_state at switch-out */
    u64 inverse_p;      /* 1 / capture probability, in 1/2^WEIGHT_SHIFT ths */
    u32 tgid;
    u32 _pad;
};

BPF_HASH(blocked, u32, struct blocked_thread, MAX_BLOCKED_THREADS);
/* Per thread: its last captured switch-out, for the capture probability. LRU: exited
 * threads age out; a thread whose entry did is captured on its next switch-out. */
BPF_TABLE("lru_hash", u32, u64, last_capture, MAX_BLOCKED_THREADS);
/* 0: on-cpu samples, 1: (unused: was ring full), 2: blocked map full, 3: off-cpu intervals,
 * 4: switch-outs whose stack was not captured, 5: of their intervals, those at least
 * MIN_BLOCK_NS long (summed under UNCAPTURED_LABEL) */
BPF_PERCPU_ARRAY(counters, u64, 6);

static __always_inline void count(int idx)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        (*c)++;
}

/* The probability (in 1/P_ONE ths) with which this switch-out's stack is captured if it is
 * (see the header), else 0. A capture is remembered. */
static __always_inline u64 capture_now(u32 tid, u64 now)
{
    if (CAPTURE_RATE_HZ == 0)
        return P_ONE;
    u64 p = P_ONE;
    u64 *last = last_capture.lookup(&tid);
    if (last && *last < now) {
        u64 scaled = (now - *last) * CAPTURE_RATE_HZ;  /* < 2^64 for gaps under ~5 days at 40 kHz */
        if (scaled < 1000000000ULL) {
            p = (scaled << P_SHIFT) / 1000000000ULL;    /* scaled < 2^30: no overflow */
            if ((u64)bpf_get_prandom_u32() >= p)
                return 0;
        }
    }
    last_capture.update(&tid, &now);
    return p;
}

/* ns x inverse_p / 2^WEIGHT_SHIFT, saturating (an interval of hours captured at a tiny p). */
static __always_inline u64 weighted_ns(u64 ns, u64 inverse_p)
{
    u64 hi = ns >> WEIGHT_SHIFT, lo = ns & ((1ULL << WEIGHT_SHIFT) - 1);
    if (hi && inverse_p > (1ULL << 62) / hi)
        return 1ULL << 62;
    return hi * inverse_p + ((lo * inverse_p) >> WEIGHT_SHIFT);
}

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if ((u32)pid_tgid == 0 || !is_target(pid_tgid >> 32))
        return 0;
    u32 zero = 0;
    struct stack_event *ev = agg_scratch.lookup(&zero);
    if (!ev)
        return 0;
    fill_stack_event(ctx, ev, pid_tgid);
    if (ev->user_len <= 0) /* kernel thread */
        return 0;
    ev->value = SAMPLE_PERIOD_NS;
    ev->aux = ON_CPU_LABEL;
    ev->kind = 0;
    struct agg_key key = {.pid = ev->pid, .tid = ev->tid, .stack_id = agg_store_stack(ev), .label = ON_CPU_LABEL};
    agg_add(&key, SAMPLE_PERIOD_NS, ev->ts_ns);
    count(0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    /* The outgoing task is current: store its stack, remember when and why it stopped. */
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 prev_tid = (u32)pid_tgid;
    if (prev_tid != 0 && is_target(pid_tgid >> 32)) {
        u64 stack_id = 0;   /* stays 0 when the stack is not captured */
        int user = 0;       /* a user thread with a user stack: kernel threads are skipped */
        u64 p = capture_now(prev_tid, now);
        if (p) {
            u32 zero = 0;
            struct stack_event *ev = agg_scratch.lookup(&zero);
            if (ev) {
                /* prev_state 0: runnable and not preempted in the kernel, i.e. rescheduled on
                 * its way back to user space (a timer tick took its CPU). Its kernel stack is
                 * always that same return path and costs half of this program: left out.
                 * Preempted in the kernel (TASK_REPORT_MAX) or blocked, the kernel stack says
                 * where. */
                fill_stack_event_parts(args, ev, pid_tgid, args->prev_state != 0);
                if (ev->user_len > 0) {
                    ev->ts_ns = now;
                    ev->aux = (u64)args->prev_state;
                    ev->kind = 1;
                    ev->value = 0;
                    stack_id = agg_store_stack(ev);
                    user = 1;
                }
            }
        } else {
            /* Not captured: the time only, for the exact sum of short blocks. A one-entry user
             * stack tells user threads from kernel threads and exiting tasks (task_struct
             * offsets from this build's headers cannot be trusted on the running kernel). */
            u64 user_ip = 0;
            user = bpf_get_stack(args, &user_ip, sizeof(user_ip), BPF_F_USER_STACK) > 0;
            if (user)
                count(4);
        }
        if (user) {
            struct blocked_thread b = {.ts_ns = now, .stack_id = stack_id, .state = (u64)args->prev_state,
                                       .inverse_p = p ? (1ULL << (P_SHIFT + WEIGHT_SHIFT)) / p : 0,
                                       .tgid = pid_tgid >> 32};
            if (blocked.update(&prev_tid, &b) != 0)
                count(2);
        }
    }
    /* The incoming task: if we saw it leave, its off-CPU interval ends now. */
    u32 next_tid = args->next_pid;
    if (next_tid == 0)
        return 0;
    struct blocked_thread *saved = blocked.lookup(&next_tid);
    if (!saved)
        return 0;
    u64 duration = now - saved->ts_ns;
    struct agg_key key = {.pid = saved->tgid, .tid = next_tid, .stack_id = saved->stack_id, .label = saved->state};
    u64 start = saved->ts_ns;
    u64 weighted = duration;
    if (duration < MIN_BLOCK_NS) {  /* summed per thread, without its stack */
        key.stack_id = 0;
        key.label = SHORT_OFF_CPU_LABEL;
    } else if (saved->stack_id == 0) {  /* long but not captured: summed per thread and state */
        key.label = UNCAPTURED_LABEL | saved->state;
        count(5);
    } else {
        weighted = weighted_ns(duration, saved->inverse_p);
    }
    blocked.delete(&next_tid);
    agg_add_weighted(&key, duration, weighted, start);
    count(3);
    return 0;
}
