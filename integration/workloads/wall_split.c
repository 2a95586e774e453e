/* Wall-time workload with a known answer: THREADS threads loop for SECONDS, each cycle
 * spinning BUSY_MS in busy_part() then sleeping SLEEP_MS in sleep_part(), while SPINNERS
 * more threads spin in spin_part() for the whole run (to load the CPUs).
 *
 * Each worker measures its own clock: the time it spent inside busy_part() and inside
 * sleep_part() (CLOCK_MONOTONIC, so time preempted or waiting for a CPU counts where the
 * thread was), and its lifetime from its first instruction to its last. At the end it prints
 * one line per worker: "worker <tid> busy_ns <n> sleep_ns <n> life_ns <n> cycles <n>".
 * Usage: wall_split SECONDS THREADS BUSY_MS SLEEP_MS [SPINNERS [us]] ("us": BUSY and SLEEP are
 * microseconds, for blocks shorter than the wall profile's 1 ms). Prints "ready <pid>", then
 * waits for a line on stdin before starting the threads (so a profiler can select it first). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64

struct worker {
    pthread_t thread;
    pid_t tid;
    unsigned long long busy_ns, sleep_ns, life_ns, cycles;
};

static double seconds;
static unsigned long long busy_ns, sleep_ns;
static volatile unsigned long sink;

static unsigned long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

__attribute__((noinline)) void busy_part(void)
{
    unsigned long long end = now_ns() + busy_ns;
    while (now_ns() < end)
        sink++;
}

__attribute__((noinline)) void sleep_part(void)
{
    struct timespec ts = {sleep_ns / 1000000000ull, sleep_ns % 1000000000ull};
    nanosleep(&ts, NULL);
}

__attribute__((noinline)) void spin_part(unsigned long long end)
{
    while (now_ns() < end)
        sink++;
}

static void *worker(void *arg)
{
    struct worker *w = arg;
    unsigned long long start = now_ns(), end = start + (unsigned long long)(seconds * 1e9);
    w->tid = gettid();
    for (unsigned long long t0 = start; t0 < end;) {
        busy_part();
        unsigned long long t1 = now_ns();
        sleep_part();
        unsigned long long t2 = now_ns();
        w->busy_ns += t1 - t0;
        w->sleep_ns += t2 - t1;
        w->cycles++;
        t0 = t2;
    }
    w->life_ns = now_ns() - start;
    return NULL;
}

static void *spinner(void *arg)
{
    spin_part(*(unsigned long long *)arg);
    return NULL;
}

int main(int argc, char **argv)
{
    seconds = argc > 1 ? atof(argv[1]) : 5;
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    unsigned long long unit = argc > 6 && argv[6][0] == 'u' ? 1000ull : 1000000ull;
    busy_ns = (argc > 3 ? atoi(argv[3]) : 30) * unit;
    sleep_ns = (argc > 4 ? atoi(argv[4]) : 70) * unit;
    int spinners = argc > 5 ? atoi(argv[5]) : 0;
    if (threads + spinners > MAX_THREADS)
        return 2;
    static struct worker workers[MAX_THREADS];
    pthread_t spin[MAX_THREADS];
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    /* The spinners outlast the workers: the load is there for every worker cycle. */
    unsigned long long spin_end = now_ns() + (unsigned long long)((seconds + 0.5) * 1e9);
    for (int i = 0; i < spinners; i++)
        pthread_create(&spin[i], NULL, spinner, &spin_end);
    for (int i = 0; i < threads; i++)
        pthread_create(&workers[i].thread, NULL, worker, &workers[i]);
    for (int i = 0; i < threads; i++)
        pthread_join(workers[i].thread, NULL);
    for (int i = 0; i < spinners; i++)
        pthread_join(spin[i], NULL);
    for (int i = 0; i < threads; i++)
        printf("worker %d busy_ns %llu sleep_ns %llu life_ns %llu cycles %llu\n", (int)workers[i].tid,
               workers[i].busy_ns, workers[i].sleep_ns, workers[i].life_ns, workers[i].cycles);
    return 0;
}
