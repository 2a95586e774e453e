/* Goroutine profile: goroutine creation and exit in Go programs, from entry uprobes only.
 *
 * Go >= 1.17 on amd64 passes arguments in registers (AX, BX, CX, ...) and keeps the current
 * goroutine's g in R14. Uretprobes are never used: Go moves goroutine stacks and return
 * probes corrupt them.
 *  - runtime.newproc1(fn *funcval, callergp *g, callerpc uintptr): fn->fn (offset 0) is the
 *    new goroutine's start PC; the creator's stack (Go keeps frame pointers) says where the
 *    `go` statement is. One ring-buffer record per creation (kind 0, aux = start PC).
 *  - runtime.goexit1(): R14 is the exiting g; its start PC is read at the per-binary offset
 *    of runtime.g.startpc (from DWARF, in `go_procs`) and counted in `exits` (no record).
 */
#include <uapi/linux/ptrace.h>
#include "stack_event.h"
#include "ring_wakeup.h"

struct exit_key {
    u32 tgid;
    u32 _pad;
    u64 start_pc;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(go_procs, u32, u32, 16384); /* tgid -> offset of runtime.g.startpc */
BPF_HASH(exits, struct exit_key, u64, 65536);
/* 0: creations, 1: ring full, 2: exits of processes without offsets, 3: exits map full */
BPF_PERCPU_ARRAY(counters, u64, 4);

static __always_inline void count(int idx)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        (*c)++;
}

int on_newproc1(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 start_pc = 0;
    bpf_probe_read_user(&start_pc, sizeof(start_pc), (void *)ctx->ax);
    struct stack_event *ev = events.ringbuf_reserve(sizeof(struct stack_event));
    if (!ev) {
        count(1);
        return 0;
    }
    fill_stack_event(ctx, ev, pid_tgid);
    ev->value = 1;
    ev->aux = start_pc;
    ev->kind = 0;
    count(0);
    events.ringbuf_submit(ev, ring_wakeup_flag());
    return 0;
}

int on_goexit1(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *startpc_off = go_procs.lookup(&tgid);
    if (!startpc_off) {
        count(2);
        return 0;
    }
    struct exit_key key = {.tgid = tgid};
    bpf_probe_read_user(&key.start_pc, sizeof(key.start_pc), (void *)(ctx->r14 + *startpc_off));
    u64 zero = 0;
    u64 *n = exits.lookup_or_try_init(&key, &zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        count(3);
    return 0;
}
