/* Allocation-heavy micro workload: waits for a line on stdin, then times N malloc/free
 * pairs of mixed sizes and prints "ns_per_pair <x>". */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile unsigned long sink;

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 2000000;
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 1;
    struct timespec a, b;
    unsigned seed = 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        char *p = malloc(16u << ((seed >> 16) % 8));
        p[0] = 1;
        sink += p[0];
        free(p);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("ns_per_pair %.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
