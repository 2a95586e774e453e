/* CPU profile, one whole record per sample: the fallback (cpu_stack_dedup off) to the
 * deduplicated program bpf/cpu.bpf.c (docs/design/stack-dedup.md). Samples every CPU at a
 * fixed frequency with a perf cpu-clock event.
 *
 * Each sample becomes one ring-buffer record with timestamp, cpu, pid, tid, thread name
 * and kernel + user stacks. At 99 Hz x CPUs this is a few hundred records a second, so
 * per-sample records (which the product needs for per-sample timestamps) are cheap;
 * aggregation happens in the agent. The idle task (pid 0) is skipped: idle is not CPU use.
 *
 * Kernel structs are never dereferenced: the headers bcc compiles against may not match
 * the running kernel (see docs/design/kernel-compatibility.md). Only helpers are used.
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>
#define PYTHON_FRAMES_COLLECTED 1  /* by on_cpu_sample, before the tail call */
#define COUNTER_SLOTS CPU_COUNTER_SLOTS
#include "counters.h"
#include "stack_event.h"
#include "ring_wakeup.h"
#ifdef NATIVE_UNWINDING   /* CFI unwinding for code without frame pointers */
#include "unwind.h"
#endif

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

/* Two programs per sample, each within the verifier's limits: on_cpu_sample reads the
 * CPython frames (bpf/python.h), then tail-calls cpu_sample_stacks (slot 0, set by the
 * agent), which copies the kernel and user stacks and unwinds them (bpf/unwind.h). */
BPF_PROG_ARRAY(cpu_stages, 1);

#include "cpu_sample_entry.h"

int cpu_sample_stacks(struct bpf_perf_event_data *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct stack_event *ev = events.ringbuf_reserve(sizeof(struct stack_event));
    if (!ev) {
        count(CPU_RING_FULL);
        return 0;
    }
    fill_stack_event(ctx, ev, pid_tgid);
#ifdef NATIVE_UNWINDING
    unwind_user_stack(ctx, ev);
#endif
    ev->value = cpu_sample_value(pid_tgid >> 32);
    ev->aux = 0;
    ev->kind = 0;
    events.ringbuf_submit(ev, ring_wakeup_flag());
    return 0;
}
