/* The per-CPU counters every program keeps, their slots, and the one helper that bumps them.
 *
 * Each program names its slots with its enum below, defines COUNTER_SLOTS as that enum's
 * *_COUNTER_SLOTS and includes this header, which declares the `counters` array (u64 per
 * slot per CPU, summed by the agent) and count()/count_add(). The agent's side of every
 * enum is in agent/bpf/layouts.py; agent/bpf/contract.py checks each constant against it at
 * compile time (docs/design/bpf-contract.md): add a slot in both places.
 *
 * Programs that aggregate in kernel maps (wall, lock: bpf/stack_agg.h) start with the
 * aggregation's own slots, so stack_agg.h counts into the same array.
 */
#ifndef STACKFLEET_COUNTERS_H
#define STACKFLEET_COUNTERS_H

/* bpf/stack_agg.h: first in the counters of the programs that include it. */
enum agg_counter {
    AGG_MAP_FULL,               /* events that found the aggregation map full */
    AGG_MAP_FULL_NS,            /* their ns */
    AGG_STACK_STORE_FAILED,
    AGG_STACKS_STORED,          /* new stack ids: how well stacks aggregate */
    AGG_CAPTURED,               /* bpf/event_capture.h: events whose stack was captured */
    AGG_SAMPLED_OUT,            /* not captured by the draw */
    AGG_CAPPED,                 /* not drawn: the CPU's window hit its hard cap */
    AGG_COUNTER_SLOTS,
};

enum cpu_counter {
    CPU_SAMPLES,
    CPU_RING_FULL,              /* dropped */
    CPU_IDLE_SKIPPED,
    CPU_TAIL_CALL_FAILED,       /* into a later stage: the sample is lost */
    /* bpf/stack_dedup.h: how the samples' stacks deduplicate */
    CPU_STACKS_STORED,          /* new stacks stored (also each CPU's serial counter) */
    CPU_STACKS_KNOWN,           /* samples sent as an id record */
    CPU_STACK_COLLISIONS,       /* a different stack under a stored id: sent whole */
    CPU_STACK_STORE_FAILED,     /* the map refused the insert: sent whole */
    CPU_STACKS_WITH_COPY,       /* stacks carrying a user-stack copy: sent whole */
    CPU_STACKS_WITH_ERROR,      /* stack capture failed: sent whole */
    CPU_SELF_NOT_KEPT,          /* the agent's own samples left out (SELF_SAMPLE_ONE_IN) */
    CPU_COUNTER_SLOTS,
};

enum wall_counter {
    WALL_ON_CPU_SAMPLES = AGG_COUNTER_SLOTS,
    WALL_THREAD_STATE_UNAVAILABLE, /* no task storage for the thread */
    WALL_OFF_CPU_INTERVALS,
    WALL_NOT_CAPTURED,          /* switch-outs whose stack was not captured */
    WALL_UNCAPTURED_LONG,       /* of their intervals, those >= MIN_BLOCK_NS (UNCAPTURED_LABEL) */
    WALL_UNWIND_TAIL_CALL_FAILED, /* into stage 2: recorded without unwinding */
    WALL_RECORD_TAIL_CALL_FAILED, /* into stage 3: an on-CPU sample lost (a switch-out keeps its
                                   * interval as not captured) */
    WALL_INTERVAL_END_UNSEEN,   /* intervals of threads switched in before the program attached */
    WALL_COUNTER_SLOTS,
};

enum lock_counter {
    LOCK_WAITS = AGG_COUNTER_SLOTS,
    LOCK_SHORT_WAITS,           /* below MIN_WAIT_NS: counted, no stack */
    LOCK_SHORT_WAIT_NS,
    LOCK_UNWIND_TAIL_CALL_FAILED, /* into stage 2: recorded without unwinding */
    LOCK_RECORD_TAIL_CALL_FAILED, /* into stage 3: the wait is lost */
    LOCK_NOT_CAPTURED,          /* long waits not captured (summed under stack id 0) */
    LOCK_THREAD_STATE_UNAVAILABLE, /* no task storage for the thread */
    LOCK_COUNTER_SLOTS,
};

enum heap_counter {
    HEAP_ALLOCATIONS,           /* precise mode: allocations seen */
    HEAP_RING_FULL,
    HEAP_LIVE_FULL,             /* the live map was full: a sampled allocation not tracked */
    HEAP_BYTES_ALLOCATED,       /* precise mode: bytes of all allocations */
    HEAP_TAIL_CALL_FAILED,      /* records lost to a failed tail call into stage 2 */
    HEAP_COUNTER_SLOTS,
};

enum goroutine_counter {
    GOROUTINE_CREATIONS,
    GOROUTINE_RING_FULL,
    GOROUTINE_EXITS_WITHOUT_OFFSETS, /* exits in processes without runtime.g offsets */
    GOROUTINE_EXITS_MAP_FULL,
    GOROUTINE_COUNTER_SLOTS,
};

#ifndef COUNTER_SLOTS
#error "define COUNTER_SLOTS (the program's *_COUNTER_SLOTS) before including counters.h"
#endif
BPF_PERCPU_ARRAY(counters, u64, COUNTER_SLOTS);

static __always_inline void count_add(u32 slot, u64 n)
{
    u64 *c = counters.lookup(&slot);
    if (c)
        *c += n;
}

static __always_inline void count(u32 slot)
{
    count_add(slot, 1);
}

#endif
