/* CPU workload with a known answer: N threads spend ~all their time in hot_leaf(),
 * always reached through main -> run_thread -> outer -> middle -> hot_leaf.
 * Usage: cpu_chain SECONDS THREADS. Prints "ready <pid>" once threads run. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile double sink;
static double seconds;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void hot_leaf(double until)
{
    double x = 1.0;
    while (now() < until) {
        for (int i = 0; i < 20000; i++)
            x = x * 1.0000001 + 0.0000001; /* HOT_LINE */
        sink = x;
    }
}

__attribute__((noinline)) void middle(double until) { hot_leaf(until); sink += 1; }
__attribute__((noinline)) void outer(double until) { middle(until); sink += 1; }

static void *run_thread(void *arg)
{
    (void)arg;
    outer(now() + seconds);
    return NULL;
}

int main(int argc, char **argv)
{
    seconds = argc > 1 ? atof(argv[1]) : 5;
    int threads = argc > 2 ? atoi(argv[2]) : 1;
    pthread_t tids[64];
    if (threads > 64)
        threads = 64;
    for (int i = 0; i < threads; i++)
        pthread_create(&tids[i], NULL, run_thread, NULL);
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (int i = 0; i < threads; i++)
        pthread_join(tids[i], NULL);
    return 0;
}
