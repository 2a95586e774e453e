/* Lock profile: user-space lock contention, seen as futex waits.
 *
 * sys_enter_futex records (start time, lock address) per thread for *wait* operations only;
 * sys_exit_futex emits one record with the wait time and the waiting stack (the thread is
 * current at syscall exit, so bpf_get_stack sees exactly the stack that called
 * pthread_mutex_lock & co). Waits shorter than MIN_WAIT_NS are not contention worth a
 * stack and are only counted. Syscall tracepoints, not kprobes (unavailable here).
 */
#include <uapi/linux/ptrace.h>
#include "stack_event.h"
#include "targets.h"

#define FUTEX_CMD_MASK 0x7f /* strips FUTEX_PRIVATE_FLAG (128) and FUTEX_CLOCK_REALTIME (256) */
#define FUTEX_WAIT 0
#define FUTEX_LOCK_PI 6
#define FUTEX_WAIT_BITSET 9
#define FUTEX_WAIT_REQUEUE_PI 11
#define FUTEX_LOCK_PI2 13

struct wait_start {
    u64 ts_ns;
    u64 uaddr;
};

BPF_HASH(waiting, u32, struct wait_start, 65536);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
/* 0: waits seen, 1: ring buffer full, 2: short waits (below MIN_WAIT_NS), 3: short wait ns */
BPF_PERCPU_ARRAY(counters, u64, 4);

static __always_inline void add(int idx, u64 v)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        *c += v;
}

TRACEPOINT_PROBE(syscalls, sys_enter_futex)
{
    int cmd = args->op & FUTEX_CMD_MASK;
    if (cmd != FUTEX_WAIT && cmd != FUTEX_WAIT_BITSET && cmd != FUTEX_LOCK_PI &&
        cmd != FUTEX_WAIT_REQUEUE_PI && cmd != FUTEX_LOCK_PI2)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    u32 tid = (u32)pid_tgid;
    struct wait_start start = {.ts_ns = bpf_ktime_get_ns(), .uaddr = (u64)args->uaddr};
    waiting.update(&tid, &start);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_futex)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct wait_start *start = waiting.lookup(&tid);
    if (!start)
        return 0;
    u64 delay = bpf_ktime_get_ns() - start->ts_ns;
    u64 uaddr = start->uaddr;
    waiting.delete(&tid);
    add(0, 1);
    if (delay < MIN_WAIT_NS) {
        add(2, 1);
        add(3, delay);
        return 0;
    }
    struct stack_event *ev = events.ringbuf_reserve(sizeof(struct stack_event));
    if (!ev) {
        add(1, 1);
        return 0;
    }
    fill_stack_event(args, ev, pid_tgid);
    ev->value = delay;
    ev->aux = uaddr;
    ev->kind = 0;
    events.ringbuf_submit(ev, 0);
    return 0;
}
