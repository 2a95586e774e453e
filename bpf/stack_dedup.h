/* Stacks deduplicated in the kernel for per-sample ring-buffer records (the CPU profile).
 *
 * Every sample is one fixed-size `struct sample_record` (56 bytes: time, cpu, pid, tid,
 * thread name, stack id, serial). A stack the program has not stored yet is stored once in
 * `known_stacks` and its record carries the whole `struct stack_event` after the header;
 * a stored stack's later samples carry only (stack id, serial). Design, correctness
 * argument and measurements: docs/design/stack-dedup.md.
 *
 * - The stack id is a 64-bit hash of the process (tgid and its generation: a fresh value
 *   after every exec and after the leader's exit, so an exec'd or reused pid never shares
 *   ids with its previous image) and of the stack's content (user and kernel return
 *   addresses up to their lengths, CPython frames, their counts and status).
 * - A hash match is never trusted alone: the stored stack is compared word for word with
 *   the sample's. A different stack under the same id (a collision) is sent whole, flagged
 *   DEDUP_UNSTORED, and counted; it does not replace the stored one.
 * - `known_stacks` is an LRU map: an entry evicted and stored again gets a new serial (a
 *   per-CPU counter), so the agent, which caches stacks by (id, serial), never resolves a
 *   record to a stack that replaced the one it was sampled with.
 * - Stacks that are not deduplicated, each sent whole and counted by reason: stacks with a
 *   user-stack copy (the agent scans it for frames frame-pointer walking skipped, and the
 *   copy differs with every sample), stacks whose capture failed (the agent counts the
 *   error per sample), and a full map.
 *
 * The structs and enum here are described in agent/bpf/layouts.py and checked against it at
 * every compile (agent/bpf/contract.py, docs/design/bpf-contract.md). Counter slots:
 * enum cpu_counter in bpf/counters.h (include it before this header).
 */
#ifndef STACKFLEET_STACK_DEDUP_H
#define STACKFLEET_STACK_DEDUP_H

#include "stack_event.h"

#ifndef KNOWN_STACK_ENTRIES
#define KNOWN_STACK_ENTRIES 4096
#endif
#ifndef PROC_GEN_ENTRIES
#define PROC_GEN_ENTRIES 65536
#endif
/* Bits of the hash kept in the stack id: all of them, except in the tests that force
 * collisions (a mask of 0 gives every stack the id 1). */
#ifndef STACK_ID_MASK
#define STACK_ID_MASK 0xffffffffffffffffULL
#endif

enum dedup_flags {
    DEDUP_ID_ONLY = 0,    /* nothing follows: the stack is (stack_id, serial) */
    DEDUP_NEW = 1,        /* a struct stack_event follows; stored under (stack_id, serial) */
    DEDUP_UNSTORED = 2,   /* a struct stack_event follows; not stored: never cache it */
};

struct sample_record {
    u64 ts_ns;          /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u64 stack_id;       /* 0 with DEDUP_UNSTORED */
    u64 serial;         /* which store of stack_id: (cpu << 48) | that CPU's store count */
    u32 pid;            /* tgid */
    u32 tid;
    u32 cpu;
    u32 flags;          /* enum dedup_flags; 0: an id record, nothing follows */
    char comm[16];      /* thread name at the sample */
};

/* What known_stacks holds: the stack as first sampled (its ts, tid and comm are that
 * sample's, not later ones'), the serial it was stored under and its process generation. */
struct known_stack {
    u64 serial;
    u64 generation;
    struct stack_event ev;
};

/* A new stack's record: the header, then the stack. */
struct full_sample_record {
    struct sample_record head;
    struct stack_event ev;
};

BPF_TABLE("lru_hash", u64, struct known_stack, known_stacks, KNOWN_STACK_ENTRIES);
/* tgid -> generation, written at exec and at the exit of the thread group leader. */
BPF_TABLE("lru_hash", u32, u64, proc_generations, PROC_GEN_ENTRIES);
BPF_PERCPU_ARRAY(dedup_scratch, struct known_stack, 1);
BPF_PERCPU_ARRAY(generation_serial, u64, 1);

static __always_inline u64 dedup_mix(u64 h, u64 w)
{
    h ^= w;
    h *= 0x9E3779B97F4A7C15ULL;
    return h ^ (h >> 31);
}

/* A new generation for `tgid`: unique per CPU and call, never 0. */
static __always_inline void dedup_new_generation(u32 tgid)
{
    u32 zero = 0;
    u64 *n = generation_serial.lookup(&zero);
    if (!n)
        return;
    *n += 1;
    u64 gen = ((u64)bpf_get_smp_processor_id() << 48) | *n;
    proc_generations.update(&tgid, &gen);
}

/* This CPU's store count after one more store: the low bits of a new stack's serial. It is
 * the CPU_STACKS_STORED counter itself (bpf/counters.h), so the count and the serials agree. */
static __always_inline u64 dedup_next_store(void)
{
    u32 slot = CPU_STACKS_STORED;
    u64 *n = counters.lookup(&slot);
    if (!n)
        return 0;
    *n += 1;
    return *n;
}

static __always_inline u32 dedup_words(s32 len)
{
    u32 n = len > 0 ? (u32)len / 8 : 0;
    return n < MAX_STACK_DEPTH ? n : MAX_STACK_DEPTH;
}

/* The stack id of the scratch stack (its generation set): never 0. */
static __always_inline u64 dedup_stack_id(struct known_stack *ks)
{
    struct stack_event *ev = &ks->ev;
    u64 h = dedup_mix(0xcbf29ce484222325ULL, ev->pid);
    h = dedup_mix(h, ks->generation);
    h = dedup_mix(h, ((u64)(u32)ev->user_len << 32) | (u32)ev->kernel_len);
    u32 nu = dedup_words(ev->user_len), nk = dedup_words(ev->kernel_len);
#pragma clang loop unroll(disable)
    for (int i = 0; i < MAX_STACK_DEPTH; i++) {
        if (i >= nu)
            break;
        h = dedup_mix(h, ev->user[i]);
    }
#pragma clang loop unroll(disable)
    for (int i = 0; i < MAX_STACK_DEPTH; i++) {
        if (i >= nk)
            break;
        h = dedup_mix(h, ev->kernel[i]);
    }
    u32 py = ev->py_count < PY_MAX_FRAMES ? ev->py_count : PY_MAX_FRAMES;
    h = dedup_mix(h, ((u64)py << 32) | (u32)ev->py_status);
#pragma clang loop unroll(disable)
    for (int i = 0; i < PY_MAX_FRAMES; i++) {
        if (i >= py)
            break;
        h = dedup_mix(h, ev->py[i].code);
        h = dedup_mix(h, ev->py[i].instr ^ ((u64)ev->py[i].marker << 56));
    }
    h &= STACK_ID_MASK;
    return h ? h : 1;
}

/* 1 if `stored` holds exactly the scratch stack (same process generation and content). */
static __always_inline int dedup_same_stack(struct known_stack *stored, struct known_stack *ks)
{
    struct stack_event *a = &stored->ev, *b = &ks->ev;
    if (stored->generation != ks->generation || a->pid != b->pid || a->user_len != b->user_len ||
        a->kernel_len != b->kernel_len || a->py_count != b->py_count || a->py_status != b->py_status)
        return 0;
    u32 nu = dedup_words(b->user_len), nk = dedup_words(b->kernel_len);
#pragma clang loop unroll(disable)
    for (int i = 0; i < MAX_STACK_DEPTH; i++) {
        if (i >= nu)
            break;
        if (a->user[i] != b->user[i])
            return 0;
    }
#pragma clang loop unroll(disable)
    for (int i = 0; i < MAX_STACK_DEPTH; i++) {
        if (i >= nk)
            break;
        if (a->kernel[i] != b->kernel[i])
            return 0;
    }
    u32 py = b->py_count < PY_MAX_FRAMES ? b->py_count : PY_MAX_FRAMES;
#pragma clang loop unroll(disable)
    for (int i = 0; i < PY_MAX_FRAMES; i++) {
        if (i >= py)
            break;
        if (a->py[i].code != b->py[i].code || a->py[i].instr != b->py[i].instr ||
            a->py[i].marker != b->py[i].marker)
            return 0;
    }
    return 1;
}

#endif
