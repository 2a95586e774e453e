/* libstackfleet_heap.so: sampled heap profiling for native processes, loaded with LD_PRELOAD.
 *
 * The library wraps the allocation functions and passes every call through to the next
 * allocator (libc's, or jemalloc/tcmalloc if they come later in the lookup order). Sampling
 * is byte-based and geometric, as in tcmalloc and Go: each thread counts down the bytes until
 * its next sample point, the distance between points being exponential with mean
 * STACKFLEET_HEAP_SAMPLE_BYTES (512 KiB by default). An allocation of s bytes is sampled when
 * a point falls inside it, with probability 1 - exp(-s/mean); the agent weights it by the
 * inverse, which makes the totals unbiased for every size.
 *
 * Only sampled allocations leave the fast path. Their address goes into a lock-free set
 * and the library calls stackfleet_heap_sampled_alloc(addr, size, mean), a function that
 * does nothing: the agent puts a uprobe on it and takes the stack there. A free looks its
 * address up in a 16 KiB bitmap (one bit per hash bucket, set while a sampled block of that
 * bucket is live); only on a hit does it search the set and, for a sampled block, call
 * stackfleet_heap_sampled_free(addr). So the unsampled fast paths cost a thread-local
 * subtraction (allocations) or one bitmap load (frees), and nothing traps into the kernel.
 *
 * The probe functions start with a 5-byte nop: kernels that optimize uprobes on x86-64
 * (Linux 6.18+) turn a probe on that instruction into a call instead of a breakpoint trap.
 *
 * Environment: STACKFLEET_HEAP_SAMPLE_BYTES (mean distance in bytes; 0 turns sampling off),
 * STACKFLEET_HEAP_SEED (fixed seed for reproducible sampling in tests; default: random).
 * The probe names and argument order are the contract with bpf/heap.bpf.c and
 * agent/heap_sampler/__init__.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

#define DEFAULT_SAMPLE_BYTES (512 * 1024)
#define NEVER ((int64_t)1 << 62) /* the countdown when sampling is off */

/* ---- probe sites ------------------------------------------------------------------------ */

/* Called for each sampled allocation and each free of a sampled block; they do nothing. */
void stackfleet_heap_sampled_alloc(void *addr, size_t size, size_t mean_bytes);
void stackfleet_heap_sampled_free(void *addr);

#if defined(__x86_64__)
/* Written in assembly so that the probed instruction is a nop5 (see the header comment). The
 * CFI directives give them an FDE (CFA = rsp + 8), so DWARF unwinders step out of them. */
__asm__(".pushsection .text\n"
        ".globl stackfleet_heap_sampled_alloc\n"
        ".type stackfleet_heap_sampled_alloc, @function\n"
        "stackfleet_heap_sampled_alloc:\n"
        "    .cfi_startproc\n"
        "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
        "    ret\n"
        "    .cfi_endproc\n"
        ".size stackfleet_heap_sampled_alloc, .-stackfleet_heap_sampled_alloc\n"
        ".globl stackfleet_heap_sampled_free\n"
        ".type stackfleet_heap_sampled_free, @function\n"
        "stackfleet_heap_sampled_free:\n"
        "    .cfi_startproc\n"
        "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
        "    ret\n"
        "    .cfi_endproc\n"
        ".size stackfleet_heap_sampled_free, .-stackfleet_heap_sampled_free\n"
        ".popsection\n");
#else
EXPORT __attribute__((noinline, noipa)) void stackfleet_heap_sampled_alloc(void *addr, size_t size, size_t mean_bytes)
{
    __asm__ volatile("" : : "r"(addr), "r"(size), "r"(mean_bytes) : "memory");
}
EXPORT __attribute__((noinline, noipa)) void stackfleet_heap_sampled_free(void *addr)
{
    __asm__ volatile("" : : "r"(addr) : "memory");
}
#endif

/* ---- statistics (read by tests and by operators with a debugger) ------------------------ */

struct stackfleet_heap_stats {
    uint64_t mean_bytes;      /* 0: sampling is off */
    uint64_t sampled_allocs;  /* probe calls for allocations */
    uint64_t sampled_frees;   /* probe calls for frees */
    uint64_t set_full;        /* sampled allocations not reported: no room in the set */
    uint64_t realloc_lost;    /* sampled blocks whose realloc failed: their free is not seen */
};

static _Atomic uint64_t n_sampled_allocs, n_sampled_frees, n_set_full, n_realloc_lost;
static uint64_t mean_bytes = DEFAULT_SAMPLE_BYTES;
static uint64_t fixed_seed;

EXPORT void stackfleet_heap_stats(struct stackfleet_heap_stats *out)
{
    out->mean_bytes = mean_bytes;
    out->sampled_allocs = atomic_load_explicit(&n_sampled_allocs, memory_order_relaxed);
    out->sampled_frees = atomic_load_explicit(&n_sampled_frees, memory_order_relaxed);
    out->set_full = atomic_load_explicit(&n_set_full, memory_order_relaxed);
    out->realloc_lost = atomic_load_explicit(&n_realloc_lost, memory_order_relaxed);
}

/* ---- the next allocator ----------------------------------------------------------------- */

static void *(*next_malloc)(size_t);
static void *(*next_calloc)(size_t, size_t);
static void *(*next_realloc)(void *, size_t);
static void free_before_init(void *);
static void (*next_free)(void *) = free_before_init; /* never NULL: free's fast path calls it */
static int (*next_posix_memalign)(void **, size_t, size_t);
static void *(*next_aligned_alloc)(size_t, size_t);
static void *(*next_memalign)(size_t, size_t);

/* dlsym may allocate (its error buffer) before the next allocator is known: those few
 * allocations come from this arena and are never freed. Each carries its size in front. */
#define BOOTSTRAP_BYTES (64 * 1024)
static _Alignas(64) char bootstrap_arena[BOOTSTRAP_BYTES];
static _Atomic size_t bootstrap_used;

static inline int in_bootstrap(const void *p)
{
    return (uintptr_t)p - (uintptr_t)bootstrap_arena < BOOTSTRAP_BYTES;
}

static void pin_bucket(const void *p);

static void *bootstrap_alloc(size_t size, size_t align)
{
    if (align < 16)
        align = 16;
    size_t used = atomic_load(&bootstrap_used), start;
    do {
        start = (used + 16 + align - 1) & ~(align - 1);
        if (start + size > BOOTSTRAP_BYTES || start + size < start)
            return NULL;
    } while (!atomic_compare_exchange_weak(&bootstrap_used, &used, start + size));
    *(size_t *)(bootstrap_arena + start - sizeof(size_t)) = size;
    pin_bucket(bootstrap_arena + start); /* its free must take the slow path */
    return bootstrap_arena + start; /* static storage: already zero, fine for calloc */
}

static size_t bootstrap_size(const void *p)
{
    return *(const size_t *)((const char *)p - sizeof(size_t));
}

/* ---- per-thread sampling state ---------------------------------------------------------- */

struct thread_state {
    int64_t bytes_until_sample; /* <= 0: a sample point fell into the last allocation */
    uint64_t rng;
    int ready;
    int initializing; /* this thread is resolving the next allocator */
};

static __thread struct thread_state thread_state __attribute__((tls_model("initial-exec")));
static _Atomic uint64_t threads_started;

static uint64_t next_random(struct thread_state *t)
{
    /* xorshift64*: fast, and plenty for choosing sampling distances. */
    uint64_t x = t->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    t->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static int64_t next_interval(struct thread_state *t)
{
    if (mean_bytes == 0)
        return NEVER;
    double u = ((double)(next_random(t) >> 11) + 0.5) * (1.0 / 9007199254740992.0); /* (0, 1) */
    double d = -log(u) * (double)mean_bytes;
    return d < 1.0 ? 1 : (int64_t)d;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static void seed_thread(struct thread_state *t)
{
    uint64_t order = atomic_fetch_add(&threads_started, 1);
    uint64_t seed;
    if (fixed_seed) {
        seed = fixed_seed + order; /* reproducible as long as threads start in the same order */
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 32) ^ ((uint64_t)syscall(SYS_gettid) << 16) ^
               (uintptr_t)t;
    }
    t->rng = mix64(seed) | 1;
    t->ready = 1;
}

/* Called when the countdown reached zero or below: 1 if this allocation is sampled. */
static __attribute__((noinline)) int countdown_expired(struct thread_state *t)
{
    if (unlikely(!t->ready)) {
        /* First allocation of the thread: the first sample point is an exponential
         * distance from the thread's first byte, like every later one. */
        seed_thread(t);
        t->bytes_until_sample += next_interval(t);
        if (t->bytes_until_sample > 0)
            return 0;
    }
    /* A point fell inside this allocation; further points inside it change nothing (the
     * block is sampled once, with probability 1 - exp(-size/mean)). */
    do
        t->bytes_until_sample += next_interval(t);
    while (t->bytes_until_sample <= 0);
    return 1;
}


/* ---- the set of sampled blocks that are live ---------------------------------------------
 * Open addressing with linear probing over a fixed table; slots go EMPTY -> address ->
 * TOMBSTONE -> address ..., never back to EMPTY, so a search may stop at the first EMPTY.
 * A given address is inserted by the thread that got it from the allocator and removed by
 * the thread that frees it, before the allocator can hand it out again: no two threads ever
 * race on one address, only on slots (compare-and-swap). A bitmap in front answers "surely
 * not sampled" for almost every free; counts per bucket say when a bit may be cleared. */
#define SET_BITS 17
#define SET_SLOTS (1u << SET_BITS)          /* 1 MiB of slots; touched pages only */
#define PROBE_LIMIT 32
#define SLOT_EMPTY ((uintptr_t)0)
#define SLOT_TOMBSTONE ((uintptr_t)1)

static _Atomic uintptr_t set_slots[SET_SLOTS];
static _Atomic uint32_t bucket_live[SET_SLOTS];
static _Atomic uint64_t bucket_bits[SET_SLOTS / 64]; /* 16 KiB: the free path's only load */

/* Allocators return 16-byte aligned blocks: the next 17 address bits spread them well enough
 * for a filter and cost one shift and one mask (a multiplicative hash showed in the free
 * path's time). */
static inline uint32_t bucket_of(const void *p)
{
    return (uint32_t)((uintptr_t)p >> 4) & (SET_SLOTS - 1);
}

/* Marks a bucket for good: the free path then always takes the slow path for its addresses.
 * Used for NULL and for the bootstrap arena's blocks, which must never reach the allocator. */
static void pin_bucket(const void *p)
{
    uint32_t b = bucket_of(p);
    atomic_fetch_add(&bucket_live[b], 1);
    atomic_fetch_or(&bucket_bits[b >> 6], 1ULL << (b & 63));
}

static inline int maybe_sampled(const void *p)
{
    uint32_t b = bucket_of(p);
    return (atomic_load_explicit(&bucket_bits[b >> 6], memory_order_relaxed) >> (b & 63)) & 1;
}

static int set_insert(void *p)
{
    uint32_t b = bucket_of(p);
    for (uint32_t i = 0; i < PROBE_LIMIT; i++) {
        _Atomic uintptr_t *slot = &set_slots[(b + i) & (SET_SLOTS - 1)];
        uintptr_t seen = atomic_load(slot);
        while (seen == SLOT_EMPTY || seen == SLOT_TOMBSTONE) {
            if (atomic_compare_exchange_weak(slot, &seen, (uintptr_t)p)) {
                atomic_fetch_add(&bucket_live[b], 1);
                atomic_fetch_or(&bucket_bits[b >> 6], 1ULL << (b & 63));
                return 1;
            }
        }
    }
    return 0;
}

static int set_remove(void *p)
{
    uint32_t b = bucket_of(p);
    for (uint32_t i = 0; i < PROBE_LIMIT; i++) {
        _Atomic uintptr_t *slot = &set_slots[(b + i) & (SET_SLOTS - 1)];
        uintptr_t seen = atomic_load(slot);
        if (seen == SLOT_EMPTY)
            return 0;
        if (seen != (uintptr_t)p)
            continue;
        atomic_store(slot, SLOT_TOMBSTONE);
        if (atomic_fetch_sub(&bucket_live[b], 1) == 1) {
            atomic_fetch_and(&bucket_bits[b >> 6], ~(1ULL << (b & 63)));
            /* An insert into this bucket may have raced with the clear: put the bit back. */
            if (atomic_load(&bucket_live[b]) != 0)
                atomic_fetch_or(&bucket_bits[b >> 6], 1ULL << (b & 63));
        }
        return 1;
    }
    return 0;
}

static void *report_sampled(void *p, size_t size)
{
    if (!p)
        return p;
    if (!set_insert(p)) {
        atomic_fetch_add_explicit(&n_set_full, 1, memory_order_relaxed);
        return p;
    }
    atomic_fetch_add_explicit(&n_sampled_allocs, 1, memory_order_relaxed);
    stackfleet_heap_sampled_alloc(p, size, mean_bytes);
    return p;
}

/* 1 if p was a sampled block (now reported freed). */
static int report_if_sampled_free(void *p)
{
    if (!set_remove(p))
        return 0;
    atomic_fetch_add_explicit(&n_sampled_frees, 1, memory_order_relaxed);
    stackfleet_heap_sampled_free(p);
    return 1;
}

/* ---- initialisation ----------------------------------------------------------------------- */

static _Atomic int init_state; /* 0: not started, 1: in progress, 2: done */

static void read_settings(void)
{
    const char *mean = getenv("STACKFLEET_HEAP_SAMPLE_BYTES");
    if (mean && *mean) {
        char *end;
        unsigned long long v = strtoull(mean, &end, 10);
        if (*end == '\0')
            mean_bytes = v;
    }
    const char *seed = getenv("STACKFLEET_HEAP_SEED");
    if (seed && *seed)
        fixed_seed = strtoull(seed, NULL, 10);
}

static void init(void)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong(&init_state, &expected, 1)) {
        /* Another thread resolves the next allocator: wait for it (only at start-up). */
        while (atomic_load(&init_state) != 2)
            sched_yield();
        return;
    }
    thread_state.initializing = 1;
    read_settings();
    next_free = dlsym(RTLD_NEXT, "free");
    next_calloc = dlsym(RTLD_NEXT, "calloc");
    next_realloc = dlsym(RTLD_NEXT, "realloc");
    next_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    next_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
    next_memalign = dlsym(RTLD_NEXT, "memalign");
    next_malloc = dlsym(RTLD_NEXT, "malloc"); /* last: the wrappers test it to see init done */
    pin_bucket(NULL);
    thread_state.initializing = 0;
    atomic_store(&init_state, 2);
}

/* 1 when the caller must serve itself from the bootstrap arena. */
static int not_ready(void)
{
    if (thread_state.initializing)
        return 1;
    init();
    return next_malloc == NULL;
}

__attribute__((constructor)) static void stackfleet_heap_init(void)
{
    if (!next_malloc)
        init();
}

/* ---- the wrappers --------------------------------------------------------------------------
 * A wrapper's fast path charges the countdown and tail-calls the next allocator; anything
 * else (a sample, the bootstrap arena, not yet initialised) is handed by a tail call to a
 * slow-path function. So the wrappers make no other calls, are leaf functions without a
 * frame of their own (-momit-leaf-frame-pointer), and the slow paths' frame pointer leads
 * the agent's stack walk from the probe straight to the function that called malloc. */

/* Charges an allocation to the countdown: 1 while no sample point has been reached. */
static inline int charge(size_t size)
{
    struct thread_state *t = &thread_state;
    t->bytes_until_sample -= (int64_t)(size > (size_t)NEVER ? (size_t)NEVER : size);
    return likely(t->bytes_until_sample > 0);
}

static inline int sample_this(size_t size)
{
    return !charge(size) && countdown_expired(&thread_state);
}

static __attribute__((noinline)) void *malloc_expired(size_t size)
{
    if (!countdown_expired(&thread_state))
        return next_malloc(size);
    return report_sampled(next_malloc(size), size);
}

static __attribute__((noinline)) void *malloc_slow(size_t size)
{
    if (not_ready())
        return bootstrap_alloc(size, 16);
    return sample_this(size) ? report_sampled(next_malloc(size), size) : next_malloc(size);
}

EXPORT void *malloc(size_t size)
{
    if (likely(next_malloc != NULL)) {
        if (likely(charge(size)))
            return next_malloc(size);
        return malloc_expired(size);
    }
    return malloc_slow(size);
}

static void free_before_init(void *p)
{
    if (!p || in_bootstrap(p) || not_ready())
        return; /* while dlsym runs, a block it got from the next calloc is leaked */
    next_free(p);
}

static __attribute__((noinline)) void free_slow(void *p)
{
    if (!p || in_bootstrap(p))
        return;
    report_if_sampled_free(p);
    next_free(p);
}

/* NULL and bootstrap blocks are in pinned buckets, and before initialisation no other block
 * exists: a clear bit is enough to hand the block to the next allocator. */
EXPORT void free(void *p)
{
    if (likely(!maybe_sampled(p))) {
        next_free(p);
        return;
    }
    free_slow(p);
}

static __attribute__((noinline)) void *calloc_expired(size_t n, size_t size)
{
    if (!countdown_expired(&thread_state))
        return next_calloc(n, size);
    return report_sampled(next_calloc(n, size), n * size);
}

static __attribute__((noinline)) void *calloc_slow(size_t n, size_t size)
{
    size_t bytes;
    int overflow = __builtin_mul_overflow(n, size, &bytes);
    if (!next_calloc && not_ready())
        return overflow ? NULL : bootstrap_alloc(bytes, 16); /* the arena is static: zeroed */
    if (overflow)
        return next_calloc(n, size); /* the allocator fails it with ENOMEM */
    return sample_this(bytes) ? report_sampled(next_calloc(n, size), bytes) : next_calloc(n, size);
}

EXPORT void *calloc(size_t n, size_t size)
{
    size_t bytes;
    if (likely(next_calloc != NULL && !__builtin_mul_overflow(n, size, &bytes))) {
        if (likely(charge(bytes)))
            return next_calloc(n, size);
        return calloc_expired(n, size);
    }
    return calloc_slow(n, size);
}

static __attribute__((noinline)) void *realloc_expired(void *p, size_t size)
{
    if (!countdown_expired(&thread_state))
        return next_realloc(p, size);
    return report_sampled(next_realloc(p, size), size);
}

static __attribute__((noinline)) void *realloc_slow(void *p, size_t size)
{
    if (in_bootstrap(p)) {
        void *q = malloc(size);
        if (q)
            memcpy(q, p, size < bootstrap_size(p) ? size : bootstrap_size(p));
        return q;
    }
    if (!next_realloc && not_ready())
        return p ? NULL : bootstrap_alloc(size, 16);
    /* Out of the set before the allocator may hand the address to another thread. */
    int was_sampled = p && report_if_sampled_free(p);
    int sampled = sample_this(size);
    void *q = next_realloc(p, size);
    if (!q && size && was_sampled)
        atomic_fetch_add_explicit(&n_realloc_lost, 1, memory_order_relaxed);
    return sampled ? report_sampled(q, size) : q;
}

EXPORT void *realloc(void *p, size_t size)
{
    if (likely(next_realloc != NULL && !maybe_sampled(p))) {
        if (likely(charge(size)))
            return next_realloc(p, size);
        return realloc_expired(p, size);
    }
    return realloc_slow(p, size);
}

/* The aligned allocators are rare: they take the slow path every time. */
static __attribute__((noinline)) int posix_memalign_slow(void **out, size_t align, size_t size)
{
    if (!next_posix_memalign && not_ready()) {
        *out = bootstrap_alloc(size, align);
        return *out ? 0 : ENOMEM;
    }
    int rc = next_posix_memalign(out, align, size);
    if (rc == 0 && sample_this(size))
        report_sampled(*out, size);
    return rc;
}

EXPORT int posix_memalign(void **out, size_t align, size_t size)
{
    return posix_memalign_slow(out, align, size);
}

static __attribute__((noinline)) void *memalign_slow(size_t align, size_t size)
{
    if (!next_memalign && not_ready())
        return bootstrap_alloc(size, align);
    void *p = next_memalign(align, size);
    return sample_this(size) ? report_sampled(p, size) : p;
}

EXPORT void *memalign(size_t align, size_t size)
{
    return memalign_slow(align, size);
}

static __attribute__((noinline)) void *aligned_alloc_slow(size_t align, size_t size)
{
    if (!next_aligned_alloc && not_ready())
        return bootstrap_alloc(size, align);
    void *p = next_aligned_alloc(align, size);
    return sample_this(size) ? report_sampled(p, size) : p;
}

EXPORT void *aligned_alloc(size_t align, size_t size)
{
    return aligned_alloc_slow(align, size);
}
