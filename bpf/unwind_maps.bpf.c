/* The native unwinder's maps, defined once per agent process (agent/unwind/sharing.py) and
 * shared with every profile program that unwinds: see bpf/unwind.h. No programs. */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>
#define UNWIND_MAPS_OWNER 1
#include "unwind.h"
