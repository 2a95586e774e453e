/* Threads that wait for a lock once, with a known answer: THREADS threads, one after another
 * (one every 150 ms, so in different 100 ms windows of a per-CPU capture budget), each waits
 * once for a mutex the main thread holds HOLD_US microseconds (less than 10 ms: not a wait
 * long enough to be captured for its length alone) and measures its own wait around
 * pthread_mutex_lock with clock_gettime. The main thread takes the mutex before it starts the
 * thread and lets go HOLD_US after the thread says it is about to lock, so the wait happens
 * unless the thread is preempted for longer than that in between.
 * Starts on a line from stdin (so a profiler can select the process first) and exits when
 * stdin ends (so it is still there to be read when its waits are reported, however late).
 * Prints "once <tid> <wait_ns>" per thread.
 * Usage: lock_once THREADS HOLD_US */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline, noclone))
#define MAX_THREADS 64

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static volatile int about_to_lock;

struct once {
    pid_t tid;
    unsigned long long wait_ns;
};

static unsigned long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

NOINLINE void wait_once(struct once *me)
{
    about_to_lock = 1;
    unsigned long long t0 = now_ns();
    pthread_mutex_lock(&lock);
    me->wait_ns = now_ns() - t0;
    pthread_mutex_unlock(&lock);
}

static void *waiter(void *arg)
{
    struct once *me = arg;
    me->tid = gettid();
    wait_once(me);
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 8;
    long hold_us = argc > 2 ? atol(argv[2]) : 3000;
    char line[16];
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (!fgets(line, sizeof line, stdin))
        return 1;
    struct once results[MAX_THREADS] = {0};
    for (int i = 0; i < threads; i++) {
        pthread_t t;
        pthread_mutex_lock(&lock);
        about_to_lock = 0;
        pthread_create(&t, NULL, waiter, &results[i]);
        while (!about_to_lock)
            sleep_us(50);
        sleep_us(hold_us);
        pthread_mutex_unlock(&lock);
        pthread_join(t, NULL);
        sleep_us(150000);
    }
    for (int i = 0; i < threads; i++)
        printf("once %d %llu\n", (int)results[i].tid, results[i].wait_ns);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin))
        ;
    return 0;
}
