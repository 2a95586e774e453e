/* Heap profile: sampled native allocations and their frees.
 *
 * Two modes (agent/actors/heap.py chooses per process):
 *  - sampled: the preload library agent/heap_sampler/ samples in the process and calls a
 *    no-op function for each sampled allocation and each free of a sampled block; the
 *    uprobes on those two functions (on_sampled_alloc/on_sampled_free, end of this file)
 *    only record. Unsampled calls never trap.
 *  - precise: uprobes on libc's allocation functions themselves trap on every call and sample
 *    here (everything down to the Go probe below). For processes selected explicitly only.
 *
 * Precise-mode sampling is byte-based and geometric like tcmalloc's and Go's: each thread counts down
 * the bytes until its next sample; the next distance is drawn from an exponential
 * distribution with mean SAMPLE_BYTES using `neg_log_table` (-ln(u) x mean for 1024 values of
 * u, filled by the agent: no floating point in BPF). Small and large allocations are both
 * represented without bias; the agent scales each sample back to an estimate.
 * Only sampled allocations cost more than a counter update: their size is stashed for the
 * return probe (which sees the address), they get a stack and enter `live`. A free of an
 * unsampled address costs one hash lookup. Uretprobes are fine here: this is libc, not Go.
 * Record kinds: enum heap_event_kind below (Go processes are never probed: the agent reads
 * their runtime's own profile).
 *
 * Records with stacks take two programs, like the CPU profile's: the probe (stage 1) decides,
 * reads the CPython frames and leaves the record's fields in `heap_pending`, then tail-calls
 * heap_record_stacks (slot 0 of `heap_stages`, set by the agent), which copies the stacks,
 * unwinds the user stack from DWARF CFI with the tables every profile shares (bpf/unwind.h,
 * with NATIVE_UNWINDING) and writes the ring-buffer record. Stacks, CPython frames and the
 * CFI walk in one program exceed the verifier's budget.
 */
#include <uapi/linux/ptrace.h>
#define COUNTER_SLOTS HEAP_COUNTER_SLOTS
#include "counters.h"
#define PYTHON_FRAMES_COLLECTED 1  /* by stage 1, before the tail call */
#include "stack_event.h"
#include "ring_wakeup.h"
#ifdef NATIVE_UNWINDING   /* CFI unwinding for code without frame pointers */
#include "unwind.h"
#endif

/* The `kind` of each record (agent/bpf/layouts.py HeapEventKind). 2 is not used. */
enum heap_event_kind {
    HEAP_EVENT_ALLOC = 0,          /* precise mode, sampled: value = size, aux = address */
    HEAP_EVENT_FREE = 1,           /* precise mode: free of a sampled address */
    HEAP_EVENT_SAMPLED_ALLOC = 3,  /* preload library: value = size, aux = address; its mean
                                      sampling distance is in `sampler_mean` under the tgid */
    HEAP_EVENT_SAMPLED_FREE = 4,   /* preload library: free of a HEAP_EVENT_SAMPLED_ALLOC block */
};

struct pending_alloc {
    u64 size;
    u64 memptr; /* posix_memalign: where the address will be written */
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(countdown, u32, s64, 65536);
BPF_HASH(pending, u32, struct pending_alloc, 65536);
BPF_HASH(live, u64, u64, MAX_LIVE);
#define NEG_LOG_ENTRIES 1024   /* agent/bpf/layouts.py HEAP_NEG_LOG_ENTRIES */
BPF_ARRAY(neg_log_table, u64, NEG_LOG_ENTRIES);

/* What stage 1 hands stage 2 (per CPU: BPF tracing programs do not nest on a CPU). */
struct heap_pending_record {
    u64 pid_tgid;
    u64 value;
    u64 aux;
    u32 kind;
    u32 with_kernel;
};
BPF_PERCPU_ARRAY(heap_pending, struct heap_pending_record, 1);
BPF_PROG_ARRAY(heap_stages, 1);

/* The per-thread countdown: 1 when this allocation is to be sampled. */
static __always_inline int should_sample(u32 tid, u64 size)
{
    count(HEAP_ALLOCATIONS);
    count_add(HEAP_BYTES_ALLOCATED, size);
    s64 fresh = 0;
    s64 *left = countdown.lookup_or_try_init(&tid, &fresh);
    if (!left)
        return 0;
    *left -= (s64)size;
    if (*left > 0)
        return 0;
    u32 idx = bpf_get_prandom_u32() % 1024;
    u64 *next = neg_log_table.lookup(&idx);
    *left = next ? (s64)*next : (s64)SAMPLE_BYTES;
    return 1;
}

/* Stage 1's end: collect the CPython frames, leave the record's fields for stage 2 and
 * tail-call it. Returns 0 once stage 2 runs (which counts its own failures), -1 if the
 * record is lost here. */
static __always_inline int record_with_stacks(struct pt_regs *ctx, u64 pid_tgid, u64 value, u64 aux, u32 kind,
                                              u32 with_kernel)
{
    int zero = 0;
    struct heap_pending_record *rec = heap_pending.lookup(&zero);
    if (!rec)
        return -1;
    rec->pid_tgid = pid_tgid;
    rec->value = value;
    rec->aux = aux;
    rec->kind = kind;
    rec->with_kernel = with_kernel;
    collect_python_frames_for_tail_call(pid_tgid);
    heap_stages.call(ctx, 0);
    count(HEAP_TAIL_CALL_FAILED);
    return -1;
}

/* Stage 2: the record with its stacks, the user stack unwound from CFI when the process has
 * tables. A record that finds the ring full is counted; a lost precise-mode allocation
 * leaves `live` (its free must not produce a record). */
int heap_record_stacks(struct pt_regs *ctx)
{
    int zero = 0;
    struct heap_pending_record *rec = heap_pending.lookup(&zero);
    if (!rec)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (rec->pid_tgid != pid_tgid)
        return 0;
    struct stack_event *ev = events.ringbuf_reserve(sizeof(struct stack_event));
    if (!ev) {
        count(HEAP_RING_FULL);
        if (rec->kind == HEAP_EVENT_ALLOC) {
            u64 addr = rec->aux;
            live.delete(&addr);
        }
        return 0;
    }
    fill_stack_event_parts(ctx, ev, pid_tgid, rec->with_kernel);
#ifdef NATIVE_UNWINDING
    unwind_task_user_stack(ev);
#endif
    ev->value = rec->value;
    ev->aux = rec->aux;
    ev->kind = rec->kind;
    events.ringbuf_submit(ev, ring_wakeup_flag());
    return 0;
}

/* libc: a sampled allocation is stashed for the return probe, which sees the address. */
static __always_inline int account(u64 size, u64 memptr)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (!should_sample(tid, size))
        return 0;
    struct pending_alloc p = {.size = size, .memptr = memptr};
    pending.update(&tid, &p);
    return 1;
}

int on_malloc(struct pt_regs *ctx) { account(PT_REGS_PARM1(ctx), 0); return 0; }
int on_calloc(struct pt_regs *ctx) { account(PT_REGS_PARM1(ctx) * PT_REGS_PARM2(ctx), 0); return 0; }
int on_aligned(struct pt_regs *ctx) { account(PT_REGS_PARM2(ctx), 0); return 0; } /* memalign, aligned_alloc */
int on_posix_memalign(struct pt_regs *ctx) { account(PT_REGS_PARM3(ctx), PT_REGS_PARM1(ctx)); return 0; }

/* A record without stacks (frees): the header fields only. */
static __always_inline void submit_stackless(u32 kind, u64 value, u64 aux)
{
    struct stack_event *ev = events.ringbuf_reserve(sizeof(struct stack_event));
    if (!ev) {
        count(HEAP_RING_FULL);
        return;
    }
    u64 pid_tgid = bpf_get_current_pid_tgid();
    ev->ts_ns = bpf_ktime_get_ns();
    ev->pid = pid_tgid >> 32;
    ev->tid = (u32)pid_tgid;
    ev->cpu = bpf_get_smp_processor_id();
    ev->user_len = 0;
    ev->kernel_len = 0;
    ev->copy_len = 0;
    ev->py_count = 0;
    ev->py_status = 0;
    ev->comm[0] = 0;
    ev->value = value;
    ev->aux = aux;
    ev->kind = kind;
    events.ringbuf_submit(ev, ring_wakeup_flag());
}

static __always_inline void record_free(void *ctx, u64 addr)
{
    if (!addr)
        return;
    u64 *size = live.lookup(&addr);
    if (!size)
        return;
    u64 freed = *size;
    live.delete(&addr);
    submit_stackless(HEAP_EVENT_FREE, freed, addr);
}

int on_free(struct pt_regs *ctx) { record_free(ctx, PT_REGS_PARM1(ctx)); return 0; }

int on_realloc(struct pt_regs *ctx)
{
    record_free(ctx, PT_REGS_PARM1(ctx));
    account(PT_REGS_PARM2(ctx), 0);
    return 0;
}

int on_alloc_return(struct pt_regs *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending_alloc *p = pending.lookup(&tid);
    if (!p)
        return 0;
    u64 size = p->size, addr = 0;
    if (p->memptr) {
        if (PT_REGS_RC(ctx) == 0)
            bpf_probe_read_user(&addr, sizeof(addr), (void *)p->memptr);
    } else {
        addr = PT_REGS_RC(ctx);
    }
    pending.delete(&tid);
    if (!addr)
        return 0;
    if (live.update(&addr, &size) != 0) {
        count(HEAP_LIVE_FULL);
        return 0;
    }
    if (record_with_stacks(ctx, bpf_get_current_pid_tgid(), size, addr, HEAP_EVENT_ALLOC, 1) != 0)
        live.delete(&addr);
    return 0;
}

/* ---- Sampled mode: uprobes on the preload library's probe functions --------------------
 * stackfleet_heap_sampled_alloc(void *addr, size_t size, size_t mean_bytes) and
 * stackfleet_heap_sampled_free(void *addr) (agent/heap_sampler/sampler.c). The library has
 * made the sampling decision and keeps the set of sampled blocks: each hit is one record.
 * Attached per library file for all processes, so the agent's own process is skipped. */
BPF_HASH(sampler_mean, u32, u64, 16384); /* tgid -> the library's mean sampling distance */

int on_sampled_alloc(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (tgid == AGENT_TGID)
        return 0;
    u64 mean = PT_REGS_PARM3(ctx);
    u64 *known = sampler_mean.lookup(&tgid);
    if (!known || *known != mean)
        sampler_mean.update(&tgid, &mean);
    /* No kernel stack: it would only show the uprobe's own path. */
    record_with_stacks(ctx, pid_tgid, PT_REGS_PARM2(ctx), PT_REGS_PARM1(ctx), HEAP_EVENT_SAMPLED_ALLOC, 0);
    return 0;
}

int on_sampled_free(struct pt_regs *ctx)
{
    if ((u32)(bpf_get_current_pid_tgid() >> 32) == AGENT_TGID)
        return 0;
    submit_stackless(HEAP_EVENT_SAMPLED_FREE, 0, PT_REGS_PARM1(ctx));
    return 0;
}
