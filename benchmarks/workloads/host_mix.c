/* A realistic-ish host workload for overhead measurements, with a fixed-work score.
 *
 * - BUSY threads run a mix of 64 distinct call paths (recursion of varying depth through
 *   generated functions), counting completed units of work;
 * - SLEEPY threads block and wake every few milliseconds (off-CPU churn, futex/nanosleep);
 * - the main thread forks a short-lived child every 100 ms (process churn).
 * Usage: host_mix SECONDS BUSY SLEEPY. Prints "units <n>" at the end. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile int stop;
static volatile unsigned long long sink;

#define DEF(n) __attribute__((noinline)) unsigned long f##n(int d, unsigned long x) \
    { if (d > 0) return f##n(d - 1, x * 31 + n); for (int i = 0; i < 200; i++) x = x * 1103515245u + 12345u; return x; }
DEF(0) DEF(1) DEF(2) DEF(3) DEF(4) DEF(5) DEF(6) DEF(7)
typedef unsigned long (*fn)(int, unsigned long);
static fn table[8] = {f0, f1, f2, f3, f4, f5, f6, f7};

static void *busy(void *arg)
{
    unsigned long long units = 0;
    unsigned seed = (unsigned)(long)arg;
    while (!stop) {
        seed = seed * 1664525u + 1013904223u;
        sink += table[seed % 8]((seed >> 8) % 8, seed);
        units++;
    }
    return (void *)(unsigned long)units;
}

static void *sleepy(void *arg)
{
    (void)arg;
    struct timespec ts = {0, 3 * 1000 * 1000};
    while (!stop) {
        nanosleep(&ts, NULL);
        sink += table[sink % 8](2, sink);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 10;
    int nbusy = argc > 2 ? atoi(argv[2]) : 2, nsleepy = argc > 3 ? atoi(argv[3]) : 4;
    pthread_t t[64];
    int n = 0;
    for (int i = 0; i < nbusy && n < 64; i++)
        pthread_create(&t[n++], NULL, busy, (void *)(long)(i + 1));
    for (int i = 0; i < nsleepy && n < 64; i++)
        pthread_create(&t[n++], NULL, sleepy, NULL);
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        pid_t child = fork();
        if (child == 0) {
            sink += table[1](3, 7);
            _exit(0);
        }
        if (child > 0)
            waitpid(child, NULL, 0);
        usleep(100 * 1000);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    stop = 1;
    unsigned long long units = 0;
    for (int i = 0; i < n; i++) {
        void *r;
        pthread_join(t[i], &r);
        if (i < nbusy)
            units += (unsigned long)r;
    }
    printf("units %llu\n", units);
    return 0;
}
