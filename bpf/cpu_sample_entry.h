/* Stage 1 of every CPU sample, shared by bpf/cpu.bpf.c and bpf/cpu_records.bpf.c: skip the
 * idle task (and most of the agent's own samples), collect the CPython frames into per-CPU
 * scratch (bpf/python.h), then tail-call slot 0 of `cpu_stages`, which the including program
 * declares (its size is the program's number of later stages). Include after counters.h,
 * stack_event.h and that declaration. */
#ifndef STACKFLEET_CPU_SAMPLE_ENTRY_H
#define STACKFLEET_CPU_SAMPLE_ENTRY_H

#ifndef SELF_SAMPLE_ONE_IN
#define SELF_SAMPLE_ONE_IN 1
#endif

/* A sample's value: its period, times SELF_SAMPLE_ONE_IN for the agent's own. */
static __always_inline u64 cpu_sample_value(u32 tgid)
{
#ifdef CPU_SELF_TGID
    if (tgid == CPU_SELF_TGID)
        return (u64)SAMPLE_PERIOD_NS * SELF_SAMPLE_ONE_IN;
#endif
    return SAMPLE_PERIOD_NS;
}

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    count(CPU_SAMPLES);
    if ((u32)pid_tgid == 0) {
        count(CPU_IDLE_SKIPPED);
        return 0;
    }
#if defined(CPU_SELF_TGID) && SELF_SAMPLE_ONE_IN > 1
    /* The agent's own samples: one in SELF_SAMPLE_ONE_IN is kept, at random, and weighs that
     * many periods (an unbiased estimate of its CPU time). Nearly every one of them is a new
     * stack (its CPython frames move at every sample), which the agent then symbolizes. */
    if ((pid_tgid >> 32) == CPU_SELF_TGID && bpf_get_prandom_u32() % SELF_SAMPLE_ONE_IN) {
        count(CPU_SELF_NOT_KEPT);
        return 0;
    }
#endif
    collect_python_frames_for_tail_call(pid_tgid);
    cpu_stages.call(ctx, 0);
    count(CPU_TAIL_CALL_FAILED);
    return 0;
}

#endif
