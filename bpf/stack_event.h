/* Shared layout of stack-carrying events sent from BPF to the agent via ring buffer.
 *
 * Stacks are copied with bpf_get_stack() straight into the reserved ring-buffer record:
 * no BPF_STACK_TRACE map, so no stack-id collisions and nothing to clear (see
 * docs/design/kernel-compatibility.md). Lengths are in bytes; a negative length is the
 * helper's error code and is counted by the agent.
 *
 * agent/bpf/layouts.py describes these structs for the agent (checked against this file at
 * every compile: docs/design/bpf-contract.md); agent/bpf/records.py decodes them.
 */
#ifndef STACKFLEET_STACK_EVENT_H
#define STACKFLEET_STACK_EVENT_H

#ifndef MAX_STACK_DEPTH
#define MAX_STACK_DEPTH 127
#endif
#ifndef STACK_COPY_BYTES
#define STACK_COPY_BYTES 512
#endif
#define PY_MAX_FRAMES 64          /* a power of two: indexes are masked for the verifier */
enum py_status { PY_STATUS_NOT_PYTHON = 0, PY_STATUS_OK = 1, PY_STATUS_NO_THREAD = 2, PY_STATUS_TRUNCATED = 3 };

/* One CPython frame as read from the interpreter (agent/runtimes/python/frames.py interprets it):
 * the code object's address, the instruction field (a pointer; 3.10: int f_lasti) and the
 * byte that marks evaluation-loop call boundaries (3.11 is_entry, 3.12+ owner). */
struct py_frame {
    u64 code;
    u64 instr;
    u32 marker;
    u32 _pad;
};

struct stack_event {
    u64 ts_ns;          /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u64 value;          /* type-specific: period for cpu, ns blocked for wall, ... */
    u64 aux;            /* type-specific: lock address, state, ... */
    u32 pid;            /* tgid */
    u32 tid;
    u32 cpu;
    s32 user_len;
    s32 kernel_len;
    u32 kind;           /* type-specific sub-kind (e.g. on-cpu / off-cpu) */
    char comm[16];      /* thread name */
    u64 user[MAX_STACK_DEPTH];
    u64 kernel[MAX_STACK_DEPTH];
    /* User stack pointer and a copy of the words above it: lets the agent recover the
     * frames that frame-pointer walking skips when the leaf is in code built without
     * frame pointers (libc), see agent/stacks/scan.py. copy_len is 0 if the read failed. */
    u64 user_sp;
    u32 copy_len;
    u32 _pad;
    u8 stack_copy[STACK_COPY_BYTES];
    /* CPython frames, innermost first (bpf/python.h); py_count is 0 for other processes. */
    u32 py_count;
    s32 py_status;
    struct py_frame py[PY_MAX_FRAMES];
};

#ifdef PYTHON_FRAMES
#include "python.h"
#else
static __always_inline void collect_python_frames_for_tail_call(u64 pid_tgid) {}
#endif

/* Copy STACK_COPY_BYTES of the user stack above ev->user_sp into the event (copy_len 0 if
 * the read fails or there is no user stack). */
static __always_inline void stack_event_copy_user(struct stack_event *ev)
{
    ev->copy_len = 0;
    if (ev->user_len > 0 && ev->user_sp &&
        bpf_probe_read_user(ev->stack_copy, STACK_COPY_BYTES, (void *)ev->user_sp) == 0)
        ev->copy_len = STACK_COPY_BYTES;
}

/* The frame-pointer user stack (bpf_get_stack) and the user stack pointer. The task's user
 * registers come from pt_regs (its layout is the hardware frame: stable across kernel
 * versions, unlike task_struct), whether we interrupted user or kernel mode. */
static __always_inline void stack_event_user_fp(void *ctx, struct stack_event *ev)
{
    ev->user_len = bpf_get_stack(ctx, ev->user, sizeof(ev->user), BPF_F_USER_STACK);
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
    u64 sp = 0;
    bpf_probe_read_kernel(&sp, sizeof(sp), &regs->sp);
    ev->user_sp = sp;
}

/* Fill pid/tid/cpu/comm/ts and the stacks into a reserved event; the kernel stack only if
 * `with_kernel` (it is the costly part: the kernel's unwinder walks from the probe), the
 * user-stack copy only if `with_copy` (else copy_len is 0: a caller that unwinds with CFI
 * takes it with stack_event_copy_user() only when unwinding did not replace the stack), the
 * frame-pointer user stack only if `with_user` (else user_len and user_sp are 0: a caller
 * that unwinds with CFI first takes it with stack_event_user_fp() only when unwinding could
 * not, so a process with tables costs one user-stack walk, not two). */
static __always_inline void fill_stack_event_opts(void *ctx, struct stack_event *ev, u64 pid_tgid,
                                                  int with_kernel, int with_copy, int with_user)
{
    ev->ts_ns = bpf_ktime_get_ns();
    ev->pid = pid_tgid >> 32;
    ev->tid = (u32)pid_tgid;
    ev->cpu = bpf_get_smp_processor_id();
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
    if (with_user) {
        stack_event_user_fp(ctx, ev);
    } else {
        ev->user_len = 0;
        ev->user_sp = 0;
    }
    if (with_kernel) {
        ev->kernel_len = bpf_get_stack(ctx, ev->kernel, sizeof(ev->kernel), 0);
    } else {
        ev->kernel_len = 0;
        ev->kernel[0] = 0;  /* stack ids hash up to the first zero */
    }
    ev->_pad = 0;
    ev->copy_len = 0;
    if (with_copy)
        stack_event_copy_user(ev);
#ifdef PYTHON_FRAMES
    python_frames_to_event(ev, pid_tgid);
#else
    ev->py_count = 0;
    ev->py_status = 0;
#endif
}

static __always_inline void fill_stack_event_parts(void *ctx, struct stack_event *ev, u64 pid_tgid,
                                                   int with_kernel)
{
    fill_stack_event_opts(ctx, ev, pid_tgid, with_kernel, 1, 1);
}

static __always_inline void fill_stack_event(void *ctx, struct stack_event *ev, u64 pid_tgid)
{
    fill_stack_event_parts(ctx, ev, pid_tgid, 1);
}

#endif
