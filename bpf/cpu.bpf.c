/* CPU profile: sample every CPU at a fixed frequency with a perf cpu-clock event.
 *
 * Each sample becomes one ring-buffer record with timestamp, cpu, pid, tid and thread name
 * (the product needs per-sample timestamps). Its stack (kernel + user, DWARF-unwound, with
 * CPython frames) is deduplicated in the kernel (bpf/stack_dedup.h): a stack seen before
 * travels as a 56-byte record carrying its id, a new one whole, once. The idle task
 * (pid 0) is skipped: idle is not CPU use.
 *
 * Three programs per sample, each within the verifier's limits: on_cpu_sample reads the
 * CPython frames (bpf/python.h) and tail-calls cpu_sample_stacks (slot 0), which takes the
 * kernel and user stacks and unwinds them (bpf/unwind.h) into per-CPU scratch and
 * tail-calls cpu_sample_emit (slot 1), which hashes, looks up and writes the record.
 *
 * Kernel structs are never dereferenced: the headers bcc compiles against may not match
 * the running kernel (see docs/design/kernel-compatibility.md). Only helpers and
 * tracepoint fields are used.
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>
#define PYTHON_FRAMES_COLLECTED 1  /* by on_cpu_sample, before the tail call */
#define COUNTER_SLOTS CPU_COUNTER_SLOTS
#include "counters.h"
#include "stack_event.h"
#include "ring_wakeup.h"
#include "stack_dedup.h"
#ifdef NATIVE_UNWINDING   /* CFI unwinding for code without frame pointers */
#include "unwind.h"
#endif

#ifndef EFAULT
#define EFAULT 14
#endif

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

/* Three programs per sample, each within the verifier's limits (slots set by the agent). */
BPF_PROG_ARRAY(cpu_stages, 2);

#include "cpu_sample_entry.h"

/* Whether the sample interrupted kernel mode. The perf context holds the interrupted
 * registers (struct pt_regs, the hardware frame: ABI-stable on x86-64), and the low two bits
 * of the saved code segment are the privilege level: 3 for user mode. A sample that
 * interrupted user mode has no kernel stack, and bpf_get_stack() would still be called and
 * zero the whole unused kernel array: ~0.3 us of a spinning thread's sample. */
static __always_inline int sample_in_kernel_mode(struct bpf_perf_event_data *ctx)
{
    return (ctx->regs.cs & 3) != 3;
}

int cpu_sample_stacks(struct bpf_perf_event_data *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    int zero = 0;
    struct known_stack *ks = dedup_scratch.lookup(&zero);
    if (!ks)
        return 0;
    struct stack_event *ev = &ks->ev;
    /* CFI first; a stack it could not unwind keeps user_len 0, and cpu_sample_emit takes
     * the frame-pointer stack then (user_stack_by_frame_pointers): one walk of the user
     * stack, not two, for a process with tables. (There rather than here: this program's
     * unwinding loop leaves it little of the verifier's budget.) */
    fill_stack_event_opts(ctx, ev, pid_tgid, sample_in_kernel_mode(ctx), 0, 0);
#ifdef NATIVE_UNWINDING
    unwind_user_stack_first(ctx, ev);
#endif
    ev->value = cpu_sample_value(pid_tgid >> 32);
    ev->aux = 0;
    ev->kind = 0;
    cpu_stages.call(ctx, 1);
    count(CPU_TAIL_CALL_FAILED);
    return 0;
}

/* Send the scratch stack whole (DEDUP_NEW: it was stored under id/serial). */
static __always_inline void emit_full(struct known_stack *ks, u64 id, u64 serial, u32 flags)
{
    struct full_sample_record *rec = events.ringbuf_reserve(sizeof(struct full_sample_record));
    if (!rec) {
        count(CPU_RING_FULL);
        return;
    }
    struct stack_event *ev = &ks->ev;
    rec->head.ts_ns = ev->ts_ns;
    rec->head.stack_id = id;
    rec->head.serial = serial;
    rec->head.pid = ev->pid;
    rec->head.tid = ev->tid;
    rec->head.cpu = ev->cpu;
    rec->head.flags = flags;
    __builtin_memcpy(rec->head.comm, ev->comm, sizeof(rec->head.comm));
    bpf_probe_read_kernel(&rec->ev, sizeof(rec->ev), ev);
    /* The agent reads a process when its first whole record arrives (agent/process/capture.py):
     * that one wakes it; later ones of the same image wait for the next wakeup or flush. */
    struct wakeup_image image = {.tgid = ev->pid, .generation = ks->generation};
    events.ringbuf_submit(rec, ring_wakeup_first_flag(sizeof(*rec), ev->ts_ns, &image));
}

/* The frame-pointer user stack of a sample that CFI did not unwind, and the copy above it.
 * The copy serves the agent's recovery of frames that frame-pointer walking skipped: a
 * CFI-unwound stack skipped none, so it is read only for the others. Never for the agent
 * itself (CPU_SELF_TGID): a copy makes a stack unique (it is sent whole and scanned in
 * Python every time), and the agent's stacks are read for their CPython frames. Its native
 * part is the exact leaf only: the agent does not unwind itself and its interpreter has no
 * frame pointers, so the words frame-pointer walking finds above the leaf are not return
 * addresses (measured: 8,064 of 8,065 outside every executable mapping) and, different at
 * every sample, made nearly every sample a new stack. */
static __always_inline void user_stack_by_frame_pointers(struct bpf_perf_event_data *ctx, struct stack_event *ev)
{
    stack_event_user_fp(ctx, ev);
#ifdef NATIVE_UNWINDING
    unwind_request_if_new(ev);
#endif
#ifdef CPU_SELF_TGID
    if (ev->pid == CPU_SELF_TGID) {
        if (ev->user_len > (s32)sizeof(u64))
            ev->user_len = sizeof(u64);
        return;
    }
#endif
    stack_event_copy_user(ev);
}

int cpu_sample_emit(struct bpf_perf_event_data *ctx)
{
    int zero = 0;
    struct known_stack *ks = dedup_scratch.lookup(&zero);
    if (!ks)
        return 0;
    struct stack_event *ev = &ks->ev;
    if (ev->user_len == 0)
        user_stack_by_frame_pointers(ctx, ev);
    /* The process image: part of the stack id, and what emit_full's wakeup is decided by. */
    u32 pid = ev->pid;
    u64 *gen = proc_generations.lookup(&pid);
    ks->generation = gen ? *gen : 0;
    if (ev->copy_len) {
        count(CPU_STACKS_WITH_COPY);
        emit_full(ks, 0, 0, DEDUP_UNSTORED);
        return 0;
    }
    if ((ev->user_len < 0 && ev->user_len != -EFAULT) || ev->kernel_len < 0) {
        count(CPU_STACKS_WITH_ERROR);
        emit_full(ks, 0, 0, DEDUP_UNSTORED);
        return 0;
    }
    u64 id = dedup_stack_id(ks);
    struct known_stack *stored = known_stacks.lookup(&id);
    if (stored) {
        /* An LRU element can be reused for another key while we read it: the serial, read
         * before and after the compare, must not have changed (a serial names one store). */
        u64 serial = *(volatile u64 *)&stored->serial;
        if (!dedup_same_stack(stored, ks) || *(volatile u64 *)&stored->serial != serial) {
            count(CPU_STACK_COLLISIONS);
            emit_full(ks, 0, 0, DEDUP_UNSTORED);
            return 0;
        }
        struct sample_record *rec = events.ringbuf_reserve(sizeof(struct sample_record));
        if (!rec) {
            count(CPU_RING_FULL);
            return 0;
        }
        rec->ts_ns = ev->ts_ns;
        rec->stack_id = id;
        rec->serial = serial;
        rec->pid = ev->pid;
        rec->tid = ev->tid;
        rec->cpu = ev->cpu;
        rec->flags = 0;
        __builtin_memcpy(rec->comm, ev->comm, sizeof(rec->comm));
        events.ringbuf_submit(rec, ring_wakeup_bytes_flag(sizeof(*rec)));
        count(CPU_STACKS_KNOWN);
        return 0;
    }
    /* A serial unique to this store: the CPU in the top bits, its store count below. */
    ks->serial = ((u64)ev->cpu << 48) | dedup_next_store();
    /* BPF_NOEXIST: another CPU may have stored the same id since the lookup; its entry
     * stays (it may already be referenced) and this sample goes whole, unstored. */
    if (known_stacks.insert(&id, ks) != 0) {
        count(CPU_STACK_STORE_FAILED);
        emit_full(ks, 0, 0, DEDUP_UNSTORED);
        return 0;
    }
    emit_full(ks, id, ks->serial, DEDUP_NEW);
    return 0;
}

/* Process generations: an exec'd image, or a pid whose leader exited (so a later process
 * reusing the pid), gets stack ids of its own. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    dedup_new_generation(bpf_get_current_pid_tgid() >> 32);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if ((u32)pid_tgid == (u32)(pid_tgid >> 32))
        dedup_new_generation(pid_tgid >> 32);
    return 0;
}
