/* Stage 1 of every CPU sample, shared by bpf/cpu.bpf.c and bpf/cpu_records.bpf.c: skip the
 * idle task, collect the CPython frames into per-CPU scratch (bpf/python.h), then tail-call
 * slot 0 of `cpu_stages`, which the including program declares (its size is the program's
 * number of later stages). Include after counters.h, stack_event.h and that declaration. */
#ifndef STACKFLEET_CPU_SAMPLE_ENTRY_H
#define STACKFLEET_CPU_SAMPLE_ENTRY_H

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    count(CPU_SAMPLES);
    if ((u32)pid_tgid == 0) {
        count(CPU_IDLE_SKIPPED);
        return 0;
    }
    collect_python_frames_for_tail_call(pid_tgid);
    cpu_stages.call(ctx, 0);
    count(CPU_TAIL_CALL_FAILED);
    return 0;
}

#endif
