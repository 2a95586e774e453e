/* Native-unwinding workload: a 4-deep call chain into a hot leaf, in code built without
 * frame pointers (-O2 -fomit-frame-pointer), so only DWARF CFI can walk it:
 *     main -> chain_one -> chain_two -> chain_three -> hot_leaf
 * Each chain function keeps a 256-byte buffer on its stack, so the return addresses lie
 * beyond the first few hundred bytes above SP (no stack-scanning shortcut reaches them),
 * and does work after its call (no tail calls). hot_leaf computes without calls except a
 * clock read every ~millisecond.
 *
 * With a second argument "waits", the chain ends in wait_leaf instead, and the main thread
 * spends its time the ways wall and lock profiles see: spinning ~1 ms, sleeping 2 ms, and
 * waiting for a mutex that a holder thread keeps most of the time; it also waits for a line on
 * stdin before starting (so a profiler can select the process first).
 * With "allocs", the chain ends in alloc_leaf, which allocates and frees a 16 KiB block, then
 * sleeps 0.2 ms, over and over (for the heap profile); it too waits for a line on stdin.
 * Usage: nofp_chain SECONDS [waits|allocs]. Prints "ready <pid>" at start and "done <n>" at the
 * end. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline, noclone))

static volatile unsigned long sink;
static int waits_mode;
static int allocs_mode;
static pthread_mutex_t contended = PTHREAD_MUTEX_INITIALIZER;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

NOINLINE unsigned long hot_leaf(double until, unsigned long x)
{
    do {
        for (int i = 0; i < 100000; i++)
            x = x * 6364136223846793005UL + 1442695040888963407UL; /* HOT_LINE */
        sink = x;
    } while (now() < until);
    return x;
}

NOINLINE unsigned long wait_leaf(double until, unsigned long x)
{
    struct timespec nap = {0, 2000000};
    do {
        double spin_end = now() + 0.001;
        while (now() < spin_end)
            x = x * 6364136223846793005UL + 1442695040888963407UL;
        nanosleep(&nap, NULL);
        pthread_mutex_lock(&contended);
        sink = x;
        pthread_mutex_unlock(&contended);
    } while (now() < until);
    return x;
}

NOINLINE unsigned long alloc_leaf(double until, unsigned long x)
{
    struct timespec nap = {0, 200000};
    do {
        unsigned char *block = malloc(16384);
        if (!block)
            abort();
        block[x & 16383] = (unsigned char)x;
        x += block[(x >> 7) & 16383];
        free(block);
        nanosleep(&nap, NULL);
    } while (now() < until);
    return x;
}

/* Keeps the mutex ~1.5 ms at a time, letting go for 0.3 ms. */
static void *holder(void *arg)
{
    double until = *(double *)arg;
    struct timespec gap = {0, 300000};
    while (now() < until) {
        pthread_mutex_lock(&contended);
        double end = now() + 0.0015;
        while (now() < end)
            sink++;
        pthread_mutex_unlock(&contended);
        nanosleep(&gap, NULL);
    }
    return NULL;
}

NOINLINE unsigned long chain_three(double until, unsigned long x)
{
    volatile unsigned char buf[256];
    memset((void *)buf, (int)x, sizeof(buf));
    unsigned long r = waits_mode    ? wait_leaf(until, x ^ buf[17])
                      : allocs_mode ? alloc_leaf(until, x ^ buf[17])
                                    : hot_leaf(until, x ^ buf[17]);
    return r + buf[3];
}

NOINLINE unsigned long chain_two(double until, unsigned long x)
{
    volatile unsigned char buf[256];
    memset((void *)buf, (int)x, sizeof(buf));
    unsigned long r = chain_three(until, x ^ buf[29]);
    return r + buf[5];
}

NOINLINE unsigned long chain_one(double until, unsigned long x)
{
    volatile unsigned char buf[256];
    memset((void *)buf, (int)x, sizeof(buf));
    unsigned long r = chain_two(until, x ^ buf[31]);
    return r + buf[7];
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 5;
    waits_mode = argc > 2 && strcmp(argv[2], "waits") == 0;
    allocs_mode = argc > 2 && strcmp(argv[2], "allocs") == 0;
    printf("ready %d\n", getpid());
    fflush(stdout);
    pthread_t holder_thread;
    double until = 0;
    if (waits_mode || allocs_mode) {
        char line[16];
        if (!fgets(line, sizeof line, stdin))
            return 1;
        until = now() + seconds;
    }
    if (waits_mode)
        pthread_create(&holder_thread, NULL, holder, &until);
    unsigned long r = chain_one(waits_mode || allocs_mode ? until : now() + seconds, (unsigned long)getpid());
    if (waits_mode)
        pthread_join(holder_thread, NULL);
    printf("done %lu\n", r & 0xff);
    return 0;
}
