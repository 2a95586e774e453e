/* Allocation-heavy micro workload: waits for a line on stdin, then times N malloc/free
 * pairs of mixed sizes (16 B .. 2 KiB), each followed by WORK steps of a dependent
 * multiply chain (the rest of a program: 0 makes a loop that does nothing but allocate),
 *   alloc_loop N [WORK]
 * and prints
 *   "ns_per_pair <wall> cpu_ns_per_pair <thread cpu> sampled <n> probe_byte <b>"
 * The thread's CPU time includes the time spent in uprobe handlers (they run in the thread's
 * context) but not time the thread waited for a CPU, which on a busy machine is most of the
 * noise. <n> is the number of allocations the heap sampler library sampled (-1 without it);
 * <b> the first byte of its probe function as the process sees it: 15 (0x0f, the nop5) when
 * no uprobe is on it, 204 (int3) or 232 (call, an optimized uprobe) when one is; -1 without
 * the library. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile unsigned long sink;

struct sampler_stats { /* struct stackfleet_heap_stats, agent/heap_sampler/sampler.c */
    uint64_t mean_bytes, sampled_allocs, sampled_frees, set_full, realloc_lost;
};

static double ns_between(struct timespec a, struct timespec b)
{
    return (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 2000000;
    long work = argc > 2 ? atol(argv[2]) : 0;
    unsigned long long acc = 1;
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 1;
    struct timespec a, b, ca, cb;
    unsigned seed = 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ca);
    for (long i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        char *p = malloc(16u << ((seed >> 16) % 8));
        p[0] = 1;
        sink += p[0];
        free(p);
        for (long k = 0; k < work; k++)
            acc = acc * 6364136223846793005ULL + 1442695040888963407ULL;
    }
    sink += acc;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cb);
    clock_gettime(CLOCK_MONOTONIC, &b);
    long long sampled = -1;
    int probe_byte = -1;
    const unsigned char *probe = (const unsigned char *)dlsym(RTLD_DEFAULT, "stackfleet_heap_sampled_alloc");
    if (probe)
        probe_byte = probe[0];
    void (*stats)(struct sampler_stats *) = (void (*)(struct sampler_stats *))dlsym(RTLD_DEFAULT, "stackfleet_heap_stats");
    if (stats) {
        struct sampler_stats s;
        stats(&s);
        sampled = (long long)s.sampled_allocs;
    }
    printf("ns_per_pair %.1f cpu_ns_per_pair %.1f sampled %lld probe_byte %d\n", ns_between(a, b) / n,
           ns_between(ca, cb) / n, sampled, probe_byte);
    return 0;
}
