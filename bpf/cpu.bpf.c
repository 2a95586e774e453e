/* CPU profile: sample every CPU at a fixed frequency with a perf cpu-clock event.
 *
 * Each sample becomes one ring-buffer record with timestamp, cpu, pid, tid, thread name
 * and kernel + user stacks. At 99 Hz x CPUs this is a few hundred records a second, so
 * per-sample records (which the product needs for per-sample timestamps) are cheap;
 * aggregation happens in the agent. The idle task (pid 0) is skipped: idle is not CPU use.
 *
 * Kernel structs are never dereferenced: the headers bcc compiles against may not match
 * the running kernel (see docs/platform.md). Only helpers are used.
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>
#include "stack_event.h"
#ifdef NATIVE_UNWINDING   /* CFI unwinding for code without frame pointers */
#include "unwind.h"
#endif

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

/* 0: samples seen, 1: ring buffer full (dropped), 2: idle skipped */
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
    count(0);
    if ((u32)pid_tgid == 0) {
        count(2);
        return 0;
    }
    struct stack_event *ev = events.ringbuf_reserve(sizeof(struct stack_event));
    if (!ev) {
        count(1);
        return 0;
    }
    fill_stack_event(ctx, ev, pid_tgid);
#ifdef NATIVE_UNWINDING
    unwind_user_stack(ctx, ev);
#endif
    ev->value = SAMPLE_PERIOD_NS;
    ev->aux = 0;
    ev->kind = 0;
    events.ringbuf_submit(ev, 0);
    return 0;
}
