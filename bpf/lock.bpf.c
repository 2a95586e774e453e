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
 * The label is the lock address (user addresses fit in 56 bits, also with 5-level paging)
 * with WAIT_BITS in its top byte: the futex command and flags, and whether the futex word
 * is the thread-id field of a glibc thread descriptor (what pthread_join waits on). The
 * agent tells mutex, rwlock, condition, join and semaphore waits apart from these and the
 * waiting stack (agent/actors/lock_waits.py).
 */
#include <uapi/linux/ptrace.h>
#define COUNTER_SLOTS LOCK_COUNTER_SLOTS
#include "counters.h"
#include "stack_event.h"
#include "stack_agg.h"
#include "event_capture.h"
#include "targets.h"
#ifdef NATIVE_UNWINDING   /* CFI unwinding for code without frame pointers */
#include "unwind.h"
#endif

#define FUTEX_CMD_MASK 0x7f /* strips FUTEX_PRIVATE_FLAG (128) and FUTEX_CLOCK_REALTIME (256) */
#define FUTEX_WAIT 0
#define FUTEX_LOCK_PI 6
#define FUTEX_WAIT_BITSET 9
#define FUTEX_WAIT_REQUEUE_PI 11
#define FUTEX_LOCK_PI2 13
#define FUTEX_PRIVATE_FLAG 128
#define FUTEX_CLOCK_REALTIME 256
#define FUTEX_BITSET_MATCH_ANY 0xffffffff

/* WAIT_BITS (agent/bpf/layouts.py LOCK_WAIT_*, checked at compile): bits 0-3 the command, then flags. */
#define WAIT_PRIVATE 0x10
#define WAIT_REALTIME 0x20
#define WAIT_MATCH_ANY 0x40
#define WAIT_THREAD_TID 0x80
#define LABEL_ADDRESS_BITS 56

/* glibc (x86-64) keeps a thread's id at this offset in its descriptor, struct pthread,
 * which starts with tcbhead_t {tcb, dtv, self}: tcb and self point at the descriptor
 * itself. pthread_join waits on the joined thread's id field until the kernel clears it.
 * Checked by integration/test_lock_profile.py on the machine's glibc. */
#ifndef GLIBC_PTHREAD_TID_OFFSET
#define GLIBC_PTHREAD_TID_OFFSET 0x2d0
#endif

/* 1 if uaddr is the tid field of a glibc thread descriptor: the words at its start
 * point at the descriptor (tcbhead_t's tcb and self). Reads user memory only. */
static __always_inline int is_thread_tid_word(u64 uaddr)
{
    if (uaddr < GLIBC_PTHREAD_TID_OFFSET)
        return 0;
    u64 pd = uaddr - GLIBC_PTHREAD_TID_OFFSET;
    u64 head[3] = {};
    if (bpf_probe_read_user(head, sizeof(head), (void *)pd) != 0)
        return 0;
    return head[0] == pd && head[2] == pd;
}

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
    int cmd = args->op & FUTEX_CMD_MASK;
    if (cmd != FUTEX_WAIT && cmd != FUTEX_WAIT_BITSET && cmd != FUTEX_LOCK_PI &&
        cmd != FUTEX_WAIT_REQUEUE_PI && cmd != FUTEX_LOCK_PI2)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    u64 uaddr = (u64)args->uaddr;
    if (uaddr >> LABEL_ADDRESS_BITS)
        return 0;   /* not a user address: the wait fails at once */
    u64 bits = cmd;
    if (args->op & FUTEX_PRIVATE_FLAG)
        bits |= WAIT_PRIVATE;
    if (args->op & FUTEX_CLOCK_REALTIME)
        bits |= WAIT_REALTIME;
    if (cmd == FUTEX_WAIT_BITSET && (u32)args->val3 == FUTEX_BITSET_MATCH_ANY)
        bits |= WAIT_MATCH_ANY;
    /* The kernel wakes a thread-id word with a shared wake (CLONE_CHILD_CLEARTID), which
     * wakes shared waits only: a private wait (every default mutex, condition, rwlock) is
     * never a join, and is not read. */
    if ((cmd == FUTEX_WAIT || cmd == FUTEX_WAIT_BITSET) && !(args->op & FUTEX_PRIVATE_FLAG) &&
        is_thread_tid_word(uaddr))
        bits |= WAIT_THREAD_TID;
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct lock_thread *t = lock_threads.task_storage_get(task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!t) {
        count(LOCK_THREAD_STATE_UNAVAILABLE);
        return 0;
    }
    t->ts_ns = bpf_ktime_get_ns();
    t->label = uaddr | (bits << LABEL_ADDRESS_BITS);
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
    u64 pi = capture_probability(&t->last_capture, now, delay, 1);  /* a thread's first wait: certain */
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
