/* The lock profile's maps when its waits come from the wall program's switch-outs (the wall
 * and lock profiles both on: bpf/lock_from_switch.h). They have the layouts of the lock
 * program's own maps (bpf/stack_agg.h's aggregation maps and stacks, enum lock_counter's
 * counters) under names of their own: bpf/lock_maps.bpf.c defines them once per agent process
 * (LOCK_MAPS_OWNER) and exports them by name, the wall program declares them extern and writes
 * them, and the lock actor drains them as it drains its own program's maps
 * (agent/actors/lock_maps.py). Include after stack_agg.h and counters.h.
 */
#ifndef STACKFLEET_LOCK_MAPS_H
#define STACKFLEET_LOCK_MAPS_H

#ifndef LOCK_AGG_ENTRIES
#define LOCK_AGG_ENTRIES 16384
#endif
#ifndef LOCK_STACK_ENTRIES
#define LOCK_STACK_ENTRIES 4096
#endif

#ifdef LOCK_MAPS_OWNER
#define LOCK_MAP(_type, _key, _leaf, _name, _entries) \
    BPF_F_TABLE(_type, _key, _leaf, _name, _entries, 0); \
    __attribute__((section("maps/export"))) struct _name##_table_t __##_name
#else
#define LOCK_MAP(_type, _key, _leaf, _name, _entries) BPF_F_TABLE("extern", _key, _leaf, _name, _entries, 0)
#endif

LOCK_MAP("hash", struct agg_key, struct agg_value, lock_agg0, LOCK_AGG_ENTRIES);
LOCK_MAP("hash", struct agg_key, struct agg_value, lock_agg1, LOCK_AGG_ENTRIES);
LOCK_MAP("array", u32, u32, lock_agg_generation, 1);
LOCK_MAP("lru_hash", u64, struct stack_event, lock_stacks, LOCK_STACK_ENTRIES);
LOCK_MAP("percpu_array", u32, u64, lock_counters, LOCK_COUNTER_SLOTS);

#endif
