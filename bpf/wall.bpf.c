/* Wall profile: where threads spend elapsed time, on-CPU and off-CPU.
 *
 * On-CPU: a perf cpu-clock sample at a fixed frequency, like the CPU profile, for target
 * processes only (value = the period).
 * Off-CPU: at sched_switch the outgoing task (still `current`) gets its stacks saved with
 * the switch-out time and task state; when it is switched back in, one record carries
 * that stack and the blocked duration. Blocks shorter than MIN_BLOCK_NS are summed per
 * thread in `short_blocks` (drained by the agent) instead of producing records.
 * Kernel threads (no user stack) are skipped: idle kthreads must not drown the profile.
 * Kinds: 0 = on-CPU sample, 1 = off-CPU interval (aux = task state at switch-out).
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>
#include "stack_event.h"
#include "targets.h"

struct short_block {
    u64 ns;
    u64 count;
    u32 tgid;
    u32 _pad;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(scratch, struct stack_event, 1);
BPF_F_TABLE("hash", u32, struct stack_event, blocked, MAX_BLOCKED_THREADS, BPF_F_NO_PREALLOC);
BPF_HASH(short_blocks, u32, struct short_block, 65536);
/* 0: on-cpu samples, 1: ring full, 2: blocked map full, 3: off-cpu records */
BPF_PERCPU_ARRAY(counters, u64, 4);

static __always_inline void count(int idx)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        (*c)++;
}

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if ((u32)pid_tgid == 0 || !is_target(pid_tgid >> 32))
        return 0;
    struct stack_event *ev = events.ringbuf_reserve(sizeof(struct stack_event));
    if (!ev) {
        count(1);
        return 0;
    }
    fill_stack_event(ctx, ev, pid_tgid);
    if (ev->user_len <= 0) { /* kernel thread */
        events.ringbuf_discard(ev, 0);
        return 0;
    }
    ev->value = SAMPLE_PERIOD_NS;
    ev->aux = 0;
    ev->kind = 0;
    count(0);
    events.ringbuf_submit(ev, 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    /* The outgoing task is current: save its stacks and the time it stopped running. */
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 prev_tid = (u32)pid_tgid;
    if (prev_tid != 0 && is_target(pid_tgid >> 32)) {
        u32 zero = 0;
        struct stack_event *ev = scratch.lookup(&zero);
        if (ev) {
            fill_stack_event(args, ev, pid_tgid);
            if (ev->user_len > 0) {
                ev->ts_ns = now;
                ev->aux = (u64)args->prev_state;
                ev->kind = 1;
                ev->value = 0;
                if (blocked.update(&prev_tid, ev) != 0)
                    count(2);
            }
        }
    }
    /* The incoming task: if we saw it leave, its off-CPU interval ends now. */
    u32 next_tid = args->next_pid;
    if (next_tid == 0)
        return 0;
    struct stack_event *saved = blocked.lookup(&next_tid);
    if (!saved)
        return 0;
    u64 duration = now - saved->ts_ns;
    if (duration < MIN_BLOCK_NS) {
        struct short_block zero_block = {};
        struct short_block *sb = short_blocks.lookup_or_try_init(&next_tid, &zero_block);
        if (sb) {
            sb->ns += duration;
            sb->count += 1;
            sb->tgid = saved->pid;
        }
        blocked.delete(&next_tid);
        return 0;
    }
    struct stack_event *ev = events.ringbuf_reserve(sizeof(struct stack_event));
    if (!ev) {
        count(1);
        blocked.delete(&next_tid);
        return 0;
    }
    bpf_probe_read_kernel(ev, sizeof(*ev), saved);
    ev->value = duration;
    blocked.delete(&next_tid);
    count(3);
    events.ringbuf_submit(ev, 0);
    return 0;
}
