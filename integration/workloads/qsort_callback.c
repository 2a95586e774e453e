/* libc-heavy workload: most CPU time is in a comparison callback called by libc's qsort,
 * which Debian builds without frame pointers:
 *     main -> sort_rounds -> qsort (libc: qsort_r, msort_with_tmp ...) -> compare_slow
 * A frame-pointer walk stops inside libc; a CFI walk continues to sort_rounds and main.
 * Usage: qsort_callback SECONDS. Prints "ready <pid>" at start and "rounds <n>" at the end. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline, noclone))
#define COUNT 20000

static volatile unsigned long sink;
static int values[COUNT];

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

NOINLINE int compare_slow(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    unsigned long h = (unsigned long)x;
    for (int i = 0; i < 40; i++)
        h = h * 2862933555777941757UL + 3037000493UL; /* CALLBACK_LINE */
    sink += h;
    return (x > y) - (x < y);
}

NOINLINE unsigned long sort_rounds(double until)
{
    unsigned long rounds = 0;
    unsigned seed = 12345;
    while (now() < until) {
        for (int i = 0; i < COUNT; i++) {
            seed = seed * 1103515245u + 12345u;
            values[i] = (int)(seed >> 8);
        }
        qsort(values, COUNT, sizeof(values[0]), compare_slow);
        rounds++;
    }
    return rounds;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 5;
    printf("ready %d\n", getpid());
    fflush(stdout);
    unsigned long rounds = sort_rounds(now() + seconds);
    printf("rounds %lu\n", rounds);
    return 0;
}
