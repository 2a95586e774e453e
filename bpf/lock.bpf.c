/* Lock profile: user-space lock contention, seen as futex waits.
 *
 * sys_enter_futex records (start time, lock address, how it waits) in the thread's
 * task-local storage for *wait* operations only; at sys_exit_futex the thread is current, so
 * its stack is exactly the one that called pthread_mutex_lock & co. Waits shorter than
 * MIN_WAIT_NS are not contention worth a stack and are only counted. Longer ones are
 * captured with probability p x q (bpf/event_capture.h: per-thread rate, per-CPU budget): a
 * captured wait stores its stack once per distinct stack and is added to its (pid, tid,
 * stack, label) aggregate with its inverse-probability weights; a wait not captured adds its
 * exact delay and count to (pid, tid, stack id 0, label), which the agent shares out over
 * the captured stacks of the same thread and label (agent/actors/lock.py). Syscall
 * tracepoints, not kprobes (unavailable here).
 *
 * Lock stacks are user stacks: the kernel's stack at sys_exit_futex is the system-call exit
 * path, never where the thread waited.
 *
 * Which calls wait and the label of a wait (lock address and wait bits): bpf/futex_wait.h.
 * When the wall profile runs too, this program is not loaded: the wall program takes the
 * waits from its switch-outs (bpf/lock_from_switch.h).
 */
#include <uapi/linux/ptrace.h>
#define COUNTER_SLOTS LOCK_COUNTER_SLOTS
#include "counters.h"
#include "stack_event.h"
#include "stack_agg.h"
#include "event_capture.h"
#include "targets.h"
#include "futex_wait.h"
#ifdef NATIVE_UNWINDING   /* CFI unwinding for code without frame pointers */
#include "unwind.h"
#endif

/* Per thread, in task-local storage (freed by the kernel with the task). */
struct lock_thread {
    u64 ts_ns;          /* start of the wait in progress, 0: none */
    u64 label;          /* its lock address | WAIT_BITS << LABEL_ADDRESS_BITS */
    u64 last_capture;   /* time of the thread's last captured wait, 0: never */
    u64 inverse_p;      /* 1 / the capture probability of the wait being recorded (1/2^16ths) */
};

BPF_TASK_STORAGE(lock_threads, struct lock_thread);
/* With native unwinding a wait takes three programs, as in bpf/wall.bpf.c: stage 1 captures
 * (sys_exit_futex), stage 2 (slot 0) unwinds, stage 3 (slot 1) hashes, stores, aggregates. */
BPF_PROG_ARRAY(lock_stages, 2);

TRACEPOINT_PROBE(syscalls, sys_enter_futex)
{
    if (!futex_op_waits(args->op))
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    u64 label = futex_wait_label((u64)args->uaddr, args->op, args->val3);
    if (!label)
        return 0;   /* not a user address: the wait fails at once */
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct lock_thread *t = lock_threads.task_storage_get(task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!t) {
        count(LOCK_THREAD_STATE_UNAVAILABLE);
        return 0;
    }
    t->ts_ns = bpf_ktime_get_ns();
    t->label = label;
    return 0;
}

/* Stage 3: the wait (stage 1 left its start in ts_ns, its length in value, its label in aux;
 * its weight is in the thread's storage). */
static __always_inline void record_wait(struct stack_event *ev)
{
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct lock_thread *t = lock_threads.task_storage_get(task, 0, 0);
    if (t)
        record_captured(ev, ev->aux, ev->value, t->inverse_p, ev->ts_ns);
}

#ifdef NATIVE_UNWINDING
int lock_wait_unwind(void *ctx)
{
    struct stack_event *ev = capture_scratch();
    if (!ev)
        return 0;
    unwind_task_user_stack(ev);
    lock_stages.call(ctx, 1);
    count(LOCK_RECORD_TAIL_CALL_FAILED);   /* stage 3 not run: the wait is lost (counted; recording it here
                            would put this stage over the verifier's budget) */
    return 0;
}

int lock_wait_record(void *ctx)
{
    struct stack_event *ev = capture_scratch();
    if (ev)
        record_wait(ev);
    return 0;
}
#endif

TRACEPOINT_PROBE(syscalls, sys_exit_futex)
{
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct lock_thread *t = lock_threads.task_storage_get(task, 0, 0);
    if (!t || !t->ts_ns)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 started = t->ts_ns;
    u64 delay = now - started;
    u64 label = t->label;
    t->ts_ns = 0;
    count(LOCK_WAITS);
    if (delay < MIN_WAIT_NS) {
        count(LOCK_SHORT_WAITS);
        count_add(LOCK_SHORT_WAIT_NS, delay);
        return 0;
    }
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 pi = capture_probability(&t->last_capture, now, delay, !t->last_capture);  /* a thread's first wait: certain */
    if (!pi) {
        count(LOCK_NOT_CAPTURED);
        record_event(pid_tgid >> 32, (u32)pid_tgid, 0, label, delay, 0, started);
        return 0;
    }
    t->inverse_p = inverse_probability(pi);
    struct stack_event *ev = capture_scratch();
    if (!ev)
        return 0;
    /* User stack only: at sys_exit the kernel stack is the system-call exit path
     * (syscall_exit_work, do_syscall_64, the entry), whatever the wait was, so it would put
     * three frames that never waited at every lock stack's leaf, for a kernel unwind each. */
    fill_stack_event_parts(args, ev, pid_tgid, 0);
    ev->ts_ns = started;
    ev->value = delay;
    ev->aux = label;
    ev->kind = 0;
#ifdef NATIVE_UNWINDING
    lock_stages.call(args, 0);
    count(LOCK_UNWIND_TAIL_CALL_FAILED);
#endif
    record_wait(ev);
    return 0;
}
