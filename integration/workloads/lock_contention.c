/* Lock contention with a known answer: THREADS threads take one mutex ITERS times each,
 * holding it HOLD_US microseconds (spinning, so the holder stays on CPU). Each thread
 * measures its own wait around pthread_mutex_lock with clock_gettime; the program prints
 * the total: "wait_ns <sum>" and "locks <n>".
 * Usage: lock_contention THREADS ITERS HOLD_US */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int iters, hold_us;
static unsigned long long total_wait_ns;
static pthread_mutex_t total_lock = PTHREAD_MUTEX_INITIALIZER;
static volatile unsigned long sink;

static unsigned long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

__attribute__((noinline)) void hold_for(unsigned long long ns)
{
    unsigned long long end = now_ns() + ns;
    while (now_ns() < end)
        sink++;
}

__attribute__((noinline)) unsigned long long contend_lock(void)
{
    unsigned long long t0 = now_ns();
    pthread_mutex_lock(&lock); /* CONTEND_LINE */
    unsigned long long waited = now_ns() - t0;
    hold_for(hold_us * 1000ull);
    pthread_mutex_unlock(&lock);
    return waited;
}

static void *worker(void *arg)
{
    (void)arg;
    unsigned long long mine = 0;
    for (int i = 0; i < iters; i++)
        mine += contend_lock();
    pthread_mutex_lock(&total_lock);
    total_wait_ns += mine;
    pthread_mutex_unlock(&total_lock);
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 4;
    iters = argc > 2 ? atoi(argv[2]) : 200;
    hold_us = argc > 3 ? atoi(argv[3]) : 2000;
    pthread_t t[64];
    for (int i = 0; i < threads && i < 64; i++)
        pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < threads && i < 64; i++)
        pthread_join(t[i], NULL);
    printf("wait_ns %llu\nlocks %d\n", total_wait_ns, threads * iters);
    return 0;
}
