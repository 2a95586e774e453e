/* Batched ring-buffer wakeups for the programs that write stack records (cpu, heap, goroutine).
 *
 * By default every bpf_ringbuf_submit wakes the agent's poll thread: ~200 wakeups a second at
 * 99 Hz on two CPUs, each a context switch and a ctypes callback under the GIL, for records
 * the agent only reads once per flush anyway. Here a record is submitted without a wakeup
 * unless WAKEUP_EVERY records were submitted on this CPU since the last one; the agent's poll
 * thread waits for these wakeups only (no timeout), and every flush takes what the ring holds
 * (agent/actors/sources.py).
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

/* The flags for a record of `size` bytes when records differ in size (the CPU profile's
 * 56-byte id records and whole stacks): a wakeup once WAKEUP_BYTES were submitted on this CPU
 * since the last one, so small records wake the agent rarely and large ones as often as the
 * ring's space needs. Only programs that define WAKEUP_BYTES get it (and its map). */
#ifdef WAKEUP_BYTES
BPF_PERCPU_ARRAY(ring_unwoken_bytes, u64, 1);

static __always_inline u64 ring_wakeup_bytes_flag(u64 size)
{
    u32 zero = 0;
    u64 *n = ring_unwoken_bytes.lookup(&zero);
    if (!n)
        return BPF_RB_FORCE_WAKEUP;
    *n += size;
    if (*n >= WAKEUP_BYTES) {
        *n = 0;
        return BPF_RB_FORCE_WAKEUP;
    }
    return BPF_RB_NO_WAKEUP;
}

/* The flags for a record the agent should see soon (the CPU profile's whole stacks: the first
 * record of a process, which the agent reads /proc for before the process may exit): a wakeup
 * unless one was forced for such a record less than NEW_RECORD_WAKEUP_NS ago on any CPU, so
 * their wakeups stay bounded however many come. The timestamp is shared by all CPUs and
 * updated without a lock: two CPUs may both wake the agent once, which is harmless. */
#ifdef NEW_RECORD_WAKEUP_NS
BPF_ARRAY(ring_soon_woken_at, u64, 1);

static __always_inline u64 ring_wakeup_soon_flag(u64 size, u64 now_ns)
{
    u32 zero = 0;
    u64 *last = ring_soon_woken_at.lookup(&zero);
    if (last && now_ns - *last >= NEW_RECORD_WAKEUP_NS) {
        *last = now_ns;
        return BPF_RB_FORCE_WAKEUP;
    }
    return ring_wakeup_bytes_flag(size);
}

/* The flags for a record the agent should see soon only the first time for `image` (the CPU
 * profile's whole stacks: a process image, tgid and generation): the first record of an image
 * asks for a wakeup as ring_wakeup_soon_flag does; once one was forced for it, its later
 * records (new stacks of a process the agent has read already, every stack of one sent whole
 * at each sample) wait for the ring's byte count like id records. An image whose first
 * record's wakeup was held back by NEW_RECORD_WAKEUP_NS is not marked: its next record asks
 * again. The map is an LRU: an image pushed out of it (many processes) wakes once more. */
struct wakeup_image {
    u64 tgid;
    u64 generation;
};

#ifndef WOKEN_IMAGE_ENTRIES
#define WOKEN_IMAGE_ENTRIES 16384
#endif
BPF_TABLE("lru_hash", struct wakeup_image, u8, ring_woken_images, WOKEN_IMAGE_ENTRIES);

static __always_inline u64 ring_wakeup_first_flag(u64 size, u64 now_ns, struct wakeup_image *image)
{
    if (ring_woken_images.lookup(image))
        return ring_wakeup_bytes_flag(size);
    u64 flags = ring_wakeup_soon_flag(size, now_ns);
    if (flags == BPF_RB_FORCE_WAKEUP) {
        u8 one = 1;
        ring_woken_images.update(image, &one);
    }
    return flags;
}
#endif
#endif

#endif
