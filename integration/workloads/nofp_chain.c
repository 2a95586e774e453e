/* Native-unwinding workload: a 4-deep call chain into a hot leaf, in code built without
 * frame pointers (-O2 -fomit-frame-pointer), so only DWARF CFI can walk it:
 *     main -> chain_one -> chain_two -> chain_three -> hot_leaf
 * Each chain function keeps a 256-byte buffer on its stack, so the return addresses lie
 * beyond the first few hundred bytes above SP (no stack-scanning shortcut reaches them),
 * and does work after its call (no tail calls). hot_leaf computes without calls except a
 * clock read every ~millisecond.
 * Usage: nofp_chain SECONDS. Prints "ready <pid>" at start and "done <n>" at the end. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline, noclone))

static volatile unsigned long sink;

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

NOINLINE unsigned long chain_three(double until, unsigned long x)
{
    volatile unsigned char buf[256];
    memset((void *)buf, (int)x, sizeof(buf));
    unsigned long r = hot_leaf(until, x ^ buf[17]);
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
    printf("ready %d\n", getpid());
    fflush(stdout);
    unsigned long r = chain_one(now() + seconds, (unsigned long)getpid());
    printf("done %lu\n", r & 0xff);
    return 0;
}
