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
 * as before; long ones not captured are summed per thread under UNCAPTURED_LABEL. The agent
 * (agent/actors/wall.py) spreads that sum over the thread's captured intervals of the same
 * window in proportion (a ratio estimate: the capture decision never depends on the stack),
 * so per-thread totals stay exact and only the split between stacks is estimated.
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>
#include "stack_event.h"
#include "stack_agg.h"
#include "targets.h"

#define ON_CPU_LABEL (1ULL << 63)
#define SHORT_OFF_CPU_LABEL ((1ULL << 63) | 1)
#define UNCAPTURED_LABEL ((1ULL << 63) | 2)

#ifndef CAPTURE_RATE_HZ
#define CAPTURE_RATE_HZ 0
#endif
#define P_ONE 65536         /* capture probability in 1/65536ths */

struct blocked_thread {
    u64 ts_ns;          /* switch-out time */
    u64 stack_id;       /* 0: the stack was not captured (sampled out) */
    u64 state;          /* prev_state at switch-out */
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

/* Whether to capture this switch-out's stack (see the header); a capture is remembered. */
static __always_inline int capture_now(u32 tid, u64 now)
{
    if (CAPTURE_RATE_HZ == 0)
        return 1;
    u64 *last = last_capture.lookup(&tid);
    if (last && *last < now) {
        u64 scaled = (now - *last) * CAPTURE_RATE_HZ;  /* < 2^64 for gaps under ~5 days at 40 kHz */
        if (scaled < 1000000000ULL && (bpf_get_prandom_u32() & (P_ONE - 1)) >= scaled * P_ONE / 1000000000ULL)
            return 0;
    }
    last_capture.update(&tid, &now);
    return 1;
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
        if (capture_now(prev_tid, now)) {
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
    if (duration < MIN_BLOCK_NS) {  /* summed per thread, without its stack */
        key.stack_id = 0;
        key.label = SHORT_OFF_CPU_LABEL;
    } else if (saved->stack_id == 0) {  /* long but not captured: summed per thread */
        key.label = UNCAPTURED_LABEL;
        count(5);
    }
    blocked.delete(&next_tid);
    agg_add(&key, duration, start);
    count(3);
    return 0;
}
