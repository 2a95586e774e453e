/* Process selection shared by the actors that trace events (wall, lock, ...).
 *
 * With TARGET_FILTER=1 only tgids present in the `targets` map (kept up to date by the agent
 * from its selectors: pid list, name pattern, cgroup) are traced; with 0 every user process
 * except the agent itself (AGENT_TGID) is. The lookup is the only cost for other processes. */
#ifndef STACKFLEET_TARGETS_H
#define STACKFLEET_TARGETS_H

BPF_HASH(targets, u32, u8, 65536);

static __always_inline int is_target(u32 tgid)
{
    if (tgid == 0 || tgid == AGENT_TGID)
        return 0;
#if TARGET_FILTER
    return targets.lookup(&tgid) != 0;
#else
    return 1;
#endif
}

#endif
