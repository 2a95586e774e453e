/* Wall-time workload with a known answer: THREADS threads loop for SECONDS, each cycle
 * spinning BUSY_MS in busy_part() then sleeping SLEEP_MS in sleep_part().
 * Usage: wall_split SECONDS THREADS BUSY_MS SLEEP_MS. Prints "ready <pid>", then waits for
 * a line on stdin before starting the threads (so a profiler can select it first). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double seconds;
static int busy_ms, sleep_ms;
static volatile unsigned long sink;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void busy_part(void)
{
    double end = now() + busy_ms / 1000.0;
    while (now() < end)
        sink++;
}

__attribute__((noinline)) void sleep_part(void)
{
    struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void *worker(void *arg)
{
    (void)arg;
    double end = now() + seconds;
    while (now() < end) {
        busy_part();
        sleep_part();
    }
    return NULL;
}

int main(int argc, char **argv)
{
    seconds = argc > 1 ? atof(argv[1]) : 5;
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    busy_ms = argc > 3 ? atoi(argv[3]) : 30;
    sleep_ms = argc > 4 ? atoi(argv[4]) : 70;
    pthread_t t[64];
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    for (int i = 0; i < threads && i < 64; i++)
        pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < threads && i < 64; i++)
        pthread_join(t[i], NULL);
    return 0;
}
