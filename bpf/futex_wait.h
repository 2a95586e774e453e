/* Futex waits: which futex calls wait, and the label a wait is aggregated under. Used by the
 * lock program's system-call tracepoints (bpf/lock.bpf.c) and by the wall program when lock
 * waits are taken from its switch-outs (bpf/lock_from_switch.h).
 *
 * The label is the lock address (user addresses fit in 56 bits, also with 5-level paging)
 * with WAIT_BITS in its top byte: the futex command and flags, and whether the futex word
 * is the thread-id field of a glibc thread descriptor (what pthread_join waits on). The
 * agent tells mutex, rwlock, condition, join and semaphore waits apart from these and the
 * waiting stack (agent/actors/lock_waits.py).
 */
#ifndef STACKFLEET_FUTEX_WAIT_H
#define STACKFLEET_FUTEX_WAIT_H

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

/* 1 if the futex operation waits. */
static __always_inline int futex_op_waits(u32 op)
{
    u32 cmd = op & FUTEX_CMD_MASK;
    return cmd == FUTEX_WAIT || cmd == FUTEX_WAIT_BITSET || cmd == FUTEX_LOCK_PI || cmd == FUTEX_WAIT_REQUEUE_PI ||
           cmd == FUTEX_LOCK_PI2;
}

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

/* The label of a wait (futex_op_waits(op)) on uaddr, or 0 if uaddr is not a user address (the
 * wait fails at once). */
static __always_inline u64 futex_wait_label(u64 uaddr, u32 op, u32 val3)
{
    if (!uaddr || uaddr >> LABEL_ADDRESS_BITS)
        return 0;
    u64 cmd = op & FUTEX_CMD_MASK;
    u64 bits = cmd;
    if (op & FUTEX_PRIVATE_FLAG)
        bits |= WAIT_PRIVATE;
    if (op & FUTEX_CLOCK_REALTIME)
        bits |= WAIT_REALTIME;
    if (cmd == FUTEX_WAIT_BITSET && val3 == FUTEX_BITSET_MATCH_ANY)
        bits |= WAIT_MATCH_ANY;
    /* The kernel wakes a thread-id word with a shared wake (CLONE_CHILD_CLEARTID), which
     * wakes shared waits only: a private wait (every default mutex, condition, rwlock) is
     * never a join, and is not read. */
    if ((cmd == FUTEX_WAIT || cmd == FUTEX_WAIT_BITSET) && !(op & FUTEX_PRIVATE_FLAG) && is_thread_tid_word(uaddr))
        bits |= WAIT_THREAD_TID;
    return uaddr | (bits << LABEL_ADDRESS_BITS);
}

#endif
