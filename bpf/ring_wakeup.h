/* Batched ring-buffer wakeups for the programs that write stack records (cpu, heap, goroutine).
 *
 * By default every bpf_ringbuf_submit wakes the agent's poll thread: ~200 wakeups a second at
 * 99 Hz on two CPUs, each a context switch and a ctypes callback under the GIL, for records
 * the agent only reads once per flush anyway. Here a record is submitted without a wakeup
 * unless WAKEUP_EVERY records were submitted on this CPU since the last one; the agent's poll
 * thread also consumes whatever is there each time its poll times out (agent/actors/base.py).
 * WAKEUP_EVERY is set from the ring's size and the CPU count so that the forced wakeups come
 * while the ring is at most about a quarter full.
 */
#ifndef STACKFLEET_RING_WAKEUP_H
#define STACKFLEET_RING_WAKEUP_H

#ifndef WAKEUP_EVERY
#define WAKEUP_EVERY 1
#endif

BPF_PERCPU_ARRAY(ring_unwoken, u64, 1);

/* The flags for this record's bpf_ringbuf_submit. */
static __always_inline u64 ring_wakeup_flag(void)
{
    u32 zero = 0;
    u64 *n = ring_unwoken.lookup(&zero);
    if (!n || ++*n >= WAKEUP_EVERY) {
        if (n)
            *n = 0;
        return BPF_RB_FORCE_WAKEUP;
    }
    return BPF_RB_NO_WAKEUP;
}

#endif
