/* Native user-stack unwinding inside BPF from compact DWARF CFI tables.
 *
 * bpf_get_stack() follows frame pointers only, and Debian's libc and CPython have none.
 * The agent turns each ELF file's .eh_frame into sorted rows (agent/unwind/cfi.py) and
 * loads them into unwind_rows once per file; each process gets one unwind_procs entry
 * listing its executable mappings, their load bias and where their file's table is. Per frame
 * this code finds the mapping (binary search), the row covering the pc (binary search),
 * computes the CFA and reads the return address and saved rbp from the user stack. Where
 * no row covers a pc (JIT code, files without CFI, gaps between FDEs) it falls back to
 * frame pointers, so mixed FP/non-FP stacks unwind across both. Design and measurements:
 * docs/design/native-unwinding.md.
 *
 * Processes without an entry keep bpf_get_stack()'s frame-pointer stack and are asked
 * for through unwind_requests (pid -> reason and pc), which the agent drains; so are the
 * tables of files a sample lands in for the first time (mappings marked pending).
 *
 * Kernel structs are never dereferenced: user registers come from the perf context when the
 * sample hit user mode, else from bpf_task_pt_regs() (struct pt_regs is ABI-stable on x86-64):
 * unwind_task_user_stack() serves tracepoints, where the task is always in the kernel.
 *
 * One set of maps for every program: bpf/unwind_maps.bpf.c defines them (UNWIND_MAPS_OWNER,
 * exported by name to the other bcc modules of the agent process) and the profile programs
 * declare them extern, so each file's table is built and loaded once for the CPU, wall and
 * lock profiles (agent/unwind/sharing.py).
 *
 * The enums and struct layouts the agent reads or writes are described in agent/bpf/layouts.py
 * and checked against this file at every compile (docs/design/bpf-contract.md).
 */
#ifndef STACKFLEET_UNWIND_H
#define STACKFLEET_UNWIND_H

#include <uapi/linux/bpf_perf_event.h>
#include "stack_event.h"

#ifndef UNWIND_MAX_ROWS
#define UNWIND_MAX_ROWS 1048576
#endif
#ifndef UNWIND_MAX_PROCS
#define UNWIND_MAX_PROCS 4096
#endif
#define UNWIND_MAX_MAPPINGS 256   /* power of two: indexes are masked with it */
#define UNWIND_MAPPING_STEPS 8    /* log2(UNWIND_MAX_MAPPINGS) */
#define UNWIND_BUCKET_STEPS 8     /* rows searched per bucket: up to 2^8 (agent/unwind/table.py) */
#ifndef UNWIND_MAX_FRAMES
#define UNWIND_MAX_FRAMES MAX_STACK_DEPTH
#endif

enum unwind_kind {
    UNWIND_NONE = 0,          /* no FDE covers the pc: frame pointers */
    UNWIND_CFA_RSP = 1,       /* CFA = rsp + cfa_offset */
    UNWIND_CFA_RBP = 2,       /* CFA = rbp + cfa_offset */
    UNWIND_PLT = 3,           /* CFA = rsp + 8 (+8 once (rip & 15) >= cfa_offset) */
    UNWIND_CFA_DEREF_RBP = 4, /* CFA = *(rbp + cfa_offset) */
    UNWIND_END = 5,           /* return address undefined: outermost frame */
    UNWIND_UNSUPPORTED = 6,
};

struct unwind_row {
    u32 pc;           /* ELF vaddr - table base */
    s32 cfa_offset;
    s16 rbp_offset;   /* caller's rbp saved at CFA + rbp_offset; 0: rbp unchanged */
    u8 kind;
    u8 pad;
};

/* A file's table in unwind_rows: `buckets` + 1 bucket entries, then its rows. Bucket entry j
 * is a row whose pc field holds the slot of the row covering relative pc (j << shift); the
 * rows covering any pc of bucket j lie between entries j and j + 1. */
struct unwind_mapping {
    u64 start;        /* [start, end) in the process */
    u64 end;
    u64 bias;         /* address - bias = row pc */
    u32 table;        /* slot of the first bucket entry in unwind_rows */
    u32 buckets;      /* 0: no table for this mapping, frame pointers */
    u32 shift;        /* log2 of the bytes of code per bucket */
    u32 flags;        /* UNWIND_MAPPING_PENDING: no table yet, ask for it when a pc lands here */
};

#define UNWIND_MAPPING_PENDING 1

struct unwind_proc {
    u32 count;        /* mappings in use, sorted by start; 0: agent gave up, keep FP stacks */
    u32 flags;
    struct unwind_mapping mappings[UNWIND_MAX_MAPPINGS];
};

/* unwind_requests values: reason << 56 | the pc that prompted it. */
enum unwind_request_reason { UNWIND_REQUEST_NEW = 1, UNWIND_REQUEST_UNKNOWN_ADDRESS = 2, UNWIND_REQUEST_TABLE = 3 };
#define UNWIND_REQUEST(reason, pc) (((u64)(reason) << 56) | (pc))

/* Counter slots, read by agent/unwind/loader.py (agent/bpf/layouts.py UnwindStat). */
enum unwind_stat {
    UNWIND_STAT_SAMPLES,       /* samples unwound here */
    UNWIND_STAT_CFI_FRAMES,    /* frames stepped with a CFI row */
    UNWIND_STAT_FP_FRAMES,     /* frames stepped with frame pointers */
    UNWIND_STAT_END,           /* stacks that ended cleanly */
    UNWIND_STAT_UNSUPPORTED,   /* stopped: rule we do not implement */
    UNWIND_STAT_READ_FAILED,   /* stopped: user memory unreadable */
    UNWIND_STAT_BAD_FRAME,     /* stopped: CFA not above sp / bad frame pointer */
    UNWIND_STAT_TRUNCATED,     /* stopped: UNWIND_MAX_FRAMES reached */
    UNWIND_STAT_UNKNOWN_ADDR,  /* a pc outside every known mapping (maps changed) */
    UNWIND_STAT_SLOTS,
};

/* Per-CPU: the counters the agent reads, and the registers of the frame being unwound.
 * The registers live in map memory between frames on purpose: the verifier knows nothing
 * about values loaded from it, so every path through one frame reaches the next frame in
 * the same state and is pruned; kept in registers, each path's slightly different range
 * knowledge made the states of later frames multiply past the 1M-instruction budget. */
struct unwind_cpu {
    u64 counters[UNWIND_STAT_SLOTS];
    u64 ip;
    u64 sp;
    u64 bp;
};

#ifdef UNWIND_MAPS_OWNER
#define UNWIND_MAP(_type, _key, _leaf, _name, _entries, _flags) \
    BPF_F_TABLE(_type, _key, _leaf, _name, _entries, _flags); \
    __attribute__((section("maps/export"))) struct _name##_table_t __##_name
#else
#define UNWIND_MAP(_type, _key, _leaf, _name, _entries, _flags) \
    BPF_F_TABLE("extern", _key, _leaf, _name, _entries, _flags)
#endif

/* unwind_cpus is per-CPU scratch shared by the programs: BPF tracing programs do not nest on
 * one CPU (the kernel's bpf_prog_active guard), so two walks never share it at once. */
UNWIND_MAP("array", u32, struct unwind_row, unwind_rows, UNWIND_MAX_ROWS, 0);
UNWIND_MAP("hash", u32, struct unwind_proc, unwind_procs, UNWIND_MAX_PROCS, BPF_F_NO_PREALLOC);
UNWIND_MAP("hash", u32, u64, unwind_requests, 1024, 0);
UNWIND_MAP("percpu_array", u32, struct unwind_cpu, unwind_cpus, 1, 0);

/* One pending request per pid (BPF_NOEXIST); the agent deletes what it has served. */
static __always_inline void unwind_request(u32 pid, u64 why)
{
    unwind_requests.insert(&pid, &why);
}

/* The interrupted user registers: from the perf context if the sample hit user mode, else
 * (and always without a perf context) the ones saved on kernel entry. Returns 0 on success. */
static __always_inline int unwind_user_regs(struct bpf_perf_event_data *ctx, u64 *ip, u64 *sp, u64 *bp)
{
    if (ctx && (ctx->regs.cs & 3) == 3) {
        *ip = ctx->regs.ip;
        *sp = ctx->regs.sp;
        *bp = ctx->regs.bp;
        return 0;
    }
    struct pt_regs *uregs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    if (!uregs)
        return -1;
    if (bpf_probe_read_kernel(ip, sizeof(*ip), &uregs->ip) || bpf_probe_read_kernel(sp, sizeof(*sp), &uregs->sp) ||
        bpf_probe_read_kernel(bp, sizeof(*bp), &uregs->bp))
        return -1;
    return *ip ? 0 : -1;
}

/* 1 if a <= b, without a branch (both below 2^63, true of user addresses and row pcs).
 * The binary searches below are branch-free so that the verifier walks each step once
 * instead of once per path: with branches it ran out of its 1M-instruction budget at a
 * few frames. */
static __always_inline u64 unwind_le(u64 a, u64 b)
{
    u64 d = b - a;
    /* Opaque to the optimizer: otherwise clang turns this back into a compare and a branch. */
    asm volatile("" : "+r"(d));
    return 1 - (d >> 63);
}

/* Last mapping whose start <= ip, if ip is inside it. */
static __always_inline struct unwind_mapping *unwind_find_mapping(struct unwind_proc *proc, u32 count, u64 ip)
{
    u32 lo = 0, len = count;
#pragma unroll
    for (int s = 0; s < UNWIND_MAPPING_STEPS; s++) {
        u32 half = len >> 1;
        u32 mid = (lo + half) & (UNWIND_MAX_MAPPINGS - 1);
        lo += half * (u32)unwind_le(proc->mappings[mid].start, ip);
        len -= half;
    }
    struct unwind_mapping *m = &proc->mappings[lo & (UNWIND_MAX_MAPPINGS - 1)];
    if (ip < m->start || ip >= m->end)
        return NULL;
    return m;
}

/* Put a CFI-unwound user stack into ev when the process has tables; returns 1 if it did.
 * `fp_taken`: ev already holds bpf_get_stack()'s frame-pointer stack (fill_stack_event()),
 * kept when this returns 0; else the caller takes that stack only when this returns 0, and
 * then asks for a process without tables (unwind_request_if_new()). ctx NULL: the task is
 * in the kernel. */
static __always_inline int unwind_user_stack_from(struct bpf_perf_event_data *ctx, struct stack_event *ev,
                                                  int fp_taken)
{
    u32 pid = ev->pid;
#ifdef UNWIND_SELF_TGID
    /* The agent does not unwind itself: its interpreter and bcc's LLVM would cost more
     * table rows than most hosts' workloads. */
    if (pid == UNWIND_SELF_TGID)
        return 0;
#endif
    struct unwind_proc *proc = unwind_procs.lookup(&pid);
    if (!proc) {
        if (fp_taken && ev->user_len > 0)
            unwind_request(pid, UNWIND_REQUEST(UNWIND_REQUEST_NEW, 0));
        return 0;
    }
    u32 count = proc->count;
    if (count == 0)
        return 0;
    if (count > UNWIND_MAX_MAPPINGS)
        count = UNWIND_MAX_MAPPINGS;
    int zero = 0;
    struct unwind_cpu *st = unwind_cpus.lookup(&zero);
    if (!st || unwind_user_regs(ctx, &st->ip, &st->sp, &st->bp))
        return 0;

    int stop = UNWIND_STAT_TRUNCATED;
    u32 n = 0;
    u64 unknown_before = st->counters[UNWIND_STAT_UNKNOWN_ADDR];
    for (int i = 0; i < UNWIND_MAX_FRAMES; i++) {
        u64 ip = st->ip, sp = st->sp, bp = st->bp;
        ev->user[i] = ip;
        n = i + 1;

        u8 kind = UNWIND_NONE;
        s32 cfa_offset = 0;
        s16 rbp_offset = 0;
        struct unwind_mapping *m = unwind_find_mapping(proc, count, ip);
        if (!m) {
            st->counters[UNWIND_STAT_UNKNOWN_ADDR]++;
            unwind_request(pid, UNWIND_REQUEST(UNWIND_REQUEST_UNKNOWN_ADDRESS, ip));
        } else if (m->buckets && ip - m->bias <= 0xffffffffULL) {
            /* Return addresses point after the call: look up the call instruction. */
            u32 pc = (u32)(ip - m->bias) - (i > 0 ? 1 : 0);
            u32 bucket = pc >> (m->shift & 31);
            if (bucket < m->buckets) {
                /* The last row with row.pc <= pc, between the bucket's two entries. Lookups
                 * fail only past UNWIND_MAX_ROWS (a corrupt entry): such a path leaves the
                 * walk at once rather than being verified through the rest of it. */
                u32 slot = m->table + bucket;
                struct unwind_row *entry = unwind_rows.lookup(&slot);
                if (!entry)
                    goto bad_table;
                u32 lo = entry->pc;
                slot++;
                entry = unwind_rows.lookup(&slot);
                if (!entry)
                    goto bad_table;
                u32 len = entry->pc - lo + 1;
                for (int s = 0; s < UNWIND_BUCKET_STEPS; s++) {
                    u32 half = len >> 1;
                    u32 mid = lo + half;
                    struct unwind_row *probe = unwind_rows.lookup(&mid);
                    if (!probe)
                        goto bad_table;
                    lo += half * (u32)unwind_le(probe->pc, pc);
                    len -= half;
                }
                struct unwind_row *row = unwind_rows.lookup(&lo);
                if (!row)
                    goto bad_table;
                if (row->pc <= pc) {
                    kind = row->kind;
                    cfa_offset = row->cfa_offset;
                    rbp_offset = row->rbp_offset;
                }
            }
        } else if (m->flags & UNWIND_MAPPING_PENDING) {
            /* Tables are built only for files samples land in: this one, now. */
            unwind_request(pid, UNWIND_REQUEST(UNWIND_REQUEST_TABLE, ip));
        }

        u64 cfa;
        if (kind == UNWIND_CFA_RSP) {
            cfa = sp + cfa_offset;
        } else if (kind == UNWIND_CFA_RBP) {
            cfa = bp + cfa_offset;
        } else if (kind == UNWIND_PLT) {
            cfa = sp + 8 + 8 * unwind_le(cfa_offset, ip & 15);
        } else if (kind == UNWIND_CFA_DEREF_RBP) {
            if (bpf_probe_read_user(&cfa, sizeof(cfa), (void *)(bp + cfa_offset))) {
                stop = UNWIND_STAT_READ_FAILED;
                break;
            }
        } else if (kind == UNWIND_NONE) {
            if (bp < sp || (bp & 7)) {
                stop = bp ? UNWIND_STAT_BAD_FRAME : UNWIND_STAT_END;
                break;
            }
            cfa = bp + 16;
            rbp_offset = -16;
        } else if (kind == UNWIND_END) {
            stop = UNWIND_STAT_END;
            break;
        } else {
            stop = UNWIND_STAT_UNSUPPORTED;
            break;
        }
        if (cfa <= sp) {
            stop = UNWIND_STAT_BAD_FRAME;
            break;
        }
        st->counters[kind == UNWIND_NONE ? UNWIND_STAT_FP_FRAMES : UNWIND_STAT_CFI_FRAMES]++;
        if (bpf_probe_read_user(&st->ip, sizeof(st->ip), (void *)(cfa - 8))) {
            stop = UNWIND_STAT_READ_FAILED;
            break;
        }
        if (rbp_offset && bpf_probe_read_user(&st->bp, sizeof(st->bp), (void *)(cfa + rbp_offset))) {
            stop = UNWIND_STAT_READ_FAILED;
            break;
        }
        st->sp = cfa;
        if (!st->ip) {
            stop = UNWIND_STAT_END;
            break;
        }
    }
    goto done;
bad_table:
    stop = UNWIND_STAT_BAD_FRAME;
done:
    /* Nothing better than what bpf_get_stack() found: keep its stack. */
    if (n < 2 && stop != UNWIND_STAT_END)
        return 0;
    ev->user_len = n * sizeof(u64);
    /* The stack copy only serves agent/stacks/scan.py's recovery of frames that frame-pointer
     * walking skipped; this stack skipped none, so the copy is withdrawn and not scanned.
     * Unless a pc lay outside every mapping the process was given (it exec'd or mapped code
     * since it was loaded, or JIT code): those frames were stepped by frame pointers like
     * bpf_get_stack()'s, and the copy can recover what they skipped (a launcher script loaded
     * when selected, then exec'd: its program's first lock waits lost their caller). */
    if (st->counters[UNWIND_STAT_UNKNOWN_ADDR] == unknown_before)
        ev->copy_len = 0;
    st->counters[UNWIND_STAT_SAMPLES]++;
    if (stop >= 0 && stop < UNWIND_STAT_SLOTS)
        st->counters[stop]++;
    return 1;
}

/* From a perf event (CPU and wall on-CPU samples), after fill_stack_event(). */
static __always_inline int unwind_user_stack(struct bpf_perf_event_data *ctx, struct stack_event *ev)
{
    return unwind_user_stack_from(ctx, ev, 1);
}

/* From a perf event, before any user stack was taken (fill_stack_event_opts() without
 * with_user): on 0 the caller takes the frame-pointer stack (stack_event_user_fp()), then
 * calls unwind_request_if_new(). */
static __always_inline int unwind_user_stack_first(struct bpf_perf_event_data *ctx, struct stack_event *ev)
{
    return unwind_user_stack_from(ctx, ev, 0);
}

/* After unwind_user_stack_first() and the frame-pointer stack: the tables of a process that
 * has a user stack and no unwind_procs entry are asked for. (Not in unwind_user_stack_from:
 * telling a kernel thread apart there, before any user stack, doubled the verifier's work.) */
static __always_inline void unwind_request_if_new(struct stack_event *ev)
{
    u32 pid = ev->pid;
#ifdef UNWIND_SELF_TGID
    if (pid == UNWIND_SELF_TGID)
        return;
#endif
    if (ev->user_len > 0 && !unwind_procs.lookup(&pid))
        unwind_request(pid, UNWIND_REQUEST(UNWIND_REQUEST_NEW, 0));
}

/* From a tracepoint (sched_switch, futex system calls): the user registers saved on entry. */
static __always_inline int unwind_task_user_stack(struct stack_event *ev)
{
    return unwind_user_stack_from(NULL, ev, 1);
}

#endif
