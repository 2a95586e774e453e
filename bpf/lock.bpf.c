/* Lock profile: user-space lock contention, seen as futex waits.
 *
 * sys_enter_futex records (start time, lock address) per thread for *wait* operations only;
 * at sys_exit_futex the thread is current, so its stack is exactly the one that called
 * pthread_mutex_lock & co: the stack is stored once per distinct stack and the wait is
 * added to its (pid, tid, stack, lock address) aggregate (bpf/stack_agg.h), which the agent
 * drains every flush. Waits shorter than MIN_WAIT_NS are not contention worth a stack and
 * are only counted. Syscall tracepoints, not kprobes (unavailable here).
 */
#include <uapi/linux/ptrace.h>
#include "stack_event.h"
#include "stack_agg.h"
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
/* 0: waits seen, 1: (unused: was ring full), 2: short waits (below MIN_WAIT_NS), 3: short wait ns */
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
    u64 started = start->ts_ns;
    u64 delay = bpf_ktime_get_ns() - started;
    u64 uaddr = start->uaddr;
    waiting.delete(&tid);
    add(0, 1);
    if (delay < MIN_WAIT_NS) {
        add(2, 1);
        add(3, delay);
        return 0;
    }
    u32 zero = 0;
    struct stack_event *ev = agg_scratch.lookup(&zero);
    if (!ev)
        return 0;
    fill_stack_event(args, ev, pid_tgid);
    ev->value = delay;
    ev->aux = uaddr;
    ev->kind = 0;
    struct agg_key key = {.pid = ev->pid, .tid = tid, .stack_id = agg_store_stack(ev), .label = uaddr};
    agg_add(&key, delay, started);
    return 0;
}
