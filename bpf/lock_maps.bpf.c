/* The lock profile's maps when its waits come from the wall program (bpf/lock_maps.h), defined
 * once per agent process (agent/actors/lock_maps.py) and exported to the wall program. No
 * programs. */
#include <uapi/linux/ptrace.h>
#define COUNTER_SLOTS 1     /* counters.h's own array, unused here: enum lock_counter sizes lock_counters */
#include "counters.h"
#include "stack_event.h"
#define AGG_LAYOUTS_ONLY 1
#include "stack_agg.h"
#define LOCK_MAPS_OWNER 1
#include "lock_maps.h"
