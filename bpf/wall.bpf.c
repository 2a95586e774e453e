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
#define COUNTER_SLOTS WALL_COUNTER_SLOTS
#include "counters.h"
#include "stack_event.h"
#include "stack_agg.h"
#include "targets.h"
#ifdef NATIVE_UNWINDING   /* CFI unwinding for code without frame pointers */
#include "unwind.h"
#endif

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

/* With native unwinding each event takes three programs, each within the verifier's budget:
 * stage 1 (below) captures the stacks and CPython frames into agg_scratch, stage 2 (slot 0)
 * unwinds the user stack from CFI tables, stage 3 (slot 1) hashes, stores and aggregates. A
 * failed tail call from stage 1 (no stage loaded) records the frame-pointer stack as stage 1
 * has it; one from stage 2 loses the event (counted). Slots are set by the agent, one array
 * per program type (the kernel binds an array to the type of the programs that use it). */
BPF_PROG_ARRAY(on_cpu_stages, 2);
BPF_PROG_ARRAY(switch_out_stages, 2);

static __always_inline void record_on_cpu(struct stack_event *ev)
{
    struct agg_key key = {.pid = ev->pid, .tid = ev->tid, .stack_id = agg_store_stack(ev), .label = ON_CPU_LABEL};
    agg_add(&key, SAMPLE_PERIOD_NS, ev->ts_ns);
    count(WALL_ON_CPU_SAMPLES);
}

/* The outgoing thread's entry: when and why it stopped, and its stack if captured (stage 1
 * left the switch-out time in ts_ns, prev_state in aux and the capture probability in value). */
static __always_inline void record_switch_out(struct stack_event *ev)
{
    u64 p = ev->value;
    struct blocked_thread b = {.ts_ns = ev->ts_ns, .stack_id = agg_store_stack(ev), .state = ev->aux,
                               .inverse_p = p ? (1ULL << (P_SHIFT + WEIGHT_SHIFT)) / p : 0, .tgid = ev->pid};
    u32 tid = ev->tid;
    if (blocked.update(&tid, &b) != 0)
        count(WALL_BLOCKED_MAP_FULL);
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
    u32 zero = 0;
    struct stack_event *ev = agg_scratch.lookup(&zero);
    if (!ev)
        return 0;
    unwind_user_stack(ctx, ev);
    on_cpu_stages.call(ctx, 1);
    count(WALL_RECORD_TAIL_CALL_FAILED);
    return 0;
}

int wall_on_cpu_record(struct bpf_perf_event_data *ctx)
{
    u32 zero = 0;
    struct stack_event *ev = agg_scratch.lookup(&zero);
    if (ev)
        record_on_cpu(ev);
    return 0;
}

int wall_switch_out_unwind(void *ctx)
{
    u32 zero = 0;
    struct stack_event *ev = agg_scratch.lookup(&zero);
    if (!ev)
        return 0;
    unwind_task_user_stack(ev);
    switch_out_stages.call(ctx, 1);
    count(WALL_RECORD_TAIL_CALL_FAILED);
    return 0;
}

int wall_switch_out_record(void *ctx)
{
    u32 zero = 0;
    struct stack_event *ev = agg_scratch.lookup(&zero);
    if (ev)
        record_switch_out(ev);
    return 0;
}
#endif

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    /* The incoming task: if we saw it leave, its off-CPU interval ends now. */
    u32 next_tid = args->next_pid;
    struct blocked_thread *saved = next_tid ? blocked.lookup(&next_tid) : 0;
    if (saved) {
        u64 duration = now - saved->ts_ns;
        struct agg_key key = {.pid = saved->tgid, .tid = next_tid, .stack_id = saved->stack_id,
                              .label = saved->state};
        u64 start = saved->ts_ns;
        u64 weighted = duration;
        if (duration < MIN_BLOCK_NS) {  /* summed per thread, without its stack */
            key.stack_id = 0;
            key.label = SHORT_OFF_CPU_LABEL;
        } else if (saved->stack_id == 0) {  /* long but not captured: summed per thread and state */
            key.label = UNCAPTURED_LABEL | saved->state;
            count(WALL_UNCAPTURED_LONG);
        } else {
            weighted = weighted_ns(duration, saved->inverse_p);
        }
        blocked.delete(&next_tid);
        agg_add_weighted(&key, duration, weighted, start);
        count(WALL_OFF_CPU_INTERVALS);
    }
    /* The outgoing task is current: store its stack, remember when and why it stopped. */
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 prev_tid = (u32)pid_tgid;
    if (prev_tid == 0 || !is_target(pid_tgid >> 32))
        return 0;
    u64 p = capture_now(prev_tid, now);
    if (!p) {
        /* Not captured: the time only, for the exact sum of short blocks. A one-entry user
         * stack tells user threads from kernel threads and exiting tasks (task_struct
         * offsets from this build's headers cannot be trusted on the running kernel). */
        u64 user_ip = 0;
        if (bpf_get_stack(args, &user_ip, sizeof(user_ip), BPF_F_USER_STACK) <= 0)
            return 0;
        count(WALL_NOT_CAPTURED);
        struct blocked_thread b = {.ts_ns = now, .stack_id = 0, .state = (u64)args->prev_state, .inverse_p = 0,
                                   .tgid = pid_tgid >> 32};
        if (blocked.update(&prev_tid, &b) != 0)
            count(WALL_BLOCKED_MAP_FULL);
        return 0;
    }
    u32 zero = 0;
    struct stack_event *ev = agg_scratch.lookup(&zero);
    if (!ev)
        return 0;
    /* prev_state 0: runnable and not preempted in the kernel, i.e. rescheduled on its way back
     * to user space (a timer tick took its CPU). Its kernel stack is always that same return
     * path and costs half of this program: left out. Preempted in the kernel (TASK_REPORT_MAX)
     * or blocked, the kernel stack says where. */
    fill_stack_event_parts(args, ev, pid_tgid, args->prev_state != 0);
    if (ev->user_len <= 0)  /* kernel thread: skipped */
        return 0;
    ev->ts_ns = now;
    ev->aux = (u64)args->prev_state;
    ev->kind = 1;
    ev->value = p;
#ifdef NATIVE_UNWINDING
    switch_out_stages.call(args, 0);
    count(WALL_UNWIND_TAIL_CALL_FAILED);
#endif
    record_switch_out(ev);
    return 0;
}
