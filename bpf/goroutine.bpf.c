/* Goroutine profile: goroutine creation and exit in Go programs, from entry uprobes only.
 *
 * Go >= 1.17 on amd64 passes arguments in registers (AX, BX, CX, ...) and keeps the current
 * goroutine's g in R14. Uretprobes are never used: Go moves goroutine stacks and return
 * probes corrupt them.
 *  - runtime.newproc1(fn *funcval, callergp *g, callerpc uintptr, ...): the same first three
 *    arguments from Go 1.17 to 1.27 (AX, BX, CX). fn->fn (offset 0) is the new goroutine's
 *    start PC; the creator's stack says where the `go` statement is. One ring-buffer record
 *    per creation (kind 0, aux = start PC).
 *  - runtime.goexit1(): R14 is the exiting g; its start PC is read at the per-binary offset
 *    of runtime.g.startpc (agent.runtimes.go.layout, in `go_procs`) and counted in `exits` (no record).
 *
 * The creator's stack: a `go` statement reaches newproc1 through systemstack, which runs it
 * on the thread's g0 stack. Walking frame pointers from there leaves the creator's stack
 * after systemstack and picks up stale words of g0's stack (seen: wrong functions as the
 * creator on Go 1.26/1.27). systemstack saves the creator's frame pointer in
 * callergp->sched.bp before switching, so when the probe runs on another g than callergp
 * the user stack is rebuilt from there: newproc1's entry, then the return address of each
 * frame on the creator's frame-pointer chain. When newproc1 runs on callergp itself
 * (coroutines call it directly) the ordinary user stack is already the creator's.
 */
#include <uapi/linux/ptrace.h>
#define COUNTER_SLOTS GOROUTINE_COUNTER_SLOTS
#include "counters.h"
#include "stack_event.h"
#include "ring_wakeup.h"

struct exit_key {
    u32 tgid;
    u32 _pad;
    u64 start_pc;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
/* Offsets inside runtime.g for one process (agent/actors/goroutine.py writes them). */
struct go_proc {
    u32 startpc;
    u32 sched_bp;
};

BPF_HASH(go_procs, u32, struct go_proc, 16384); /* tgid -> runtime.g offsets */
BPF_HASH(exits, struct exit_key, u64, 65536);

/* Replace the event's user stack with the creator goroutine's: see the top of this file. */
static __always_inline void creator_stack(struct pt_regs *ctx, struct stack_event *ev, struct go_proc *proc)
{
    u64 bp = 0;
    if (bpf_probe_read_user(&bp, sizeof(bp), (void *)(ctx->bx + proc->sched_bp)) || !bp)
        return;
    ev->user[0] = PT_REGS_IP(ctx);
    int n = 1;
    for (int i = 1; i < MAX_STACK_DEPTH; i++) {
        u64 frame[2]; /* saved caller frame pointer, return address */
        if (bpf_probe_read_user(frame, sizeof(frame), (void *)bp) || !frame[1])
            break;
        ev->user[i] = frame[1];
        n = i + 1;
        if (frame[0] <= bp) /* the chain climbs the stack; anything else is the end or garbage */
            break;
        bp = frame[0];
    }
    ev->user_len = n * sizeof(u64);
    ev->copy_len = 0; /* the g0 copy taken by fill_stack_event is not this stack */
}

int on_newproc1(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    u64 start_pc = 0;
    bpf_probe_read_user(&start_pc, sizeof(start_pc), (void *)ctx->ax);
    struct stack_event *ev = events.ringbuf_reserve(sizeof(struct stack_event));
    if (!ev) {
        count(GOROUTINE_RING_FULL);
        return 0;
    }
    fill_stack_event(ctx, ev, pid_tgid);
    struct go_proc *proc = go_procs.lookup(&tgid);
    if (proc && proc->sched_bp && ctx->bx && ctx->bx != ctx->r14)
        creator_stack(ctx, ev, proc);
    ev->value = 1;
    ev->aux = start_pc;
    ev->kind = 0;
    count(GOROUTINE_CREATIONS);
    events.ringbuf_submit(ev, ring_wakeup_flag());
    return 0;
}

int on_goexit1(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct go_proc *proc = go_procs.lookup(&tgid);
    if (!proc || !proc->startpc) {
        count(GOROUTINE_EXITS_WITHOUT_OFFSETS);
        return 0;
    }
    struct exit_key key = {.tgid = tgid};
    bpf_probe_read_user(&key.start_pc, sizeof(key.start_pc), (void *)(ctx->r14 + proc->startpc));
    u64 zero = 0;
    u64 *n = exits.lookup_or_try_init(&key, &zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        count(GOROUTINE_EXITS_MAP_FULL);
    return 0;
}
