/* Lock contention with a known answer, next to waits that are not contention.
 *
 * THREADS threads take one mutex ITERS times each, holding it HOLD_US microseconds
 * (spinning, so the holder stays on CPU), and measure their own wait around
 * pthread_mutex_lock with clock_gettime. Two more threads take one rwlock for writing
 * ITERS / 4 times each, holding it HOLD_US / 2, and measure their waits the same way.
 * Meanwhile one thread waits on a condition variable and one on a semaphore until the
 * workers are done, and the main thread waits in pthread_join for the workers.
 * Prints "wait_ns <mutex wait>", "rw_wait_ns <rwlock wait>", "locks <n>" and the waiting
 * threads' ids: "cond_tid", "sem_tid".
 * With "gate", a warm-up thread waits on a semaphore nobody posts, in 50 ms waits (in
 * warm_up), until a line arrives on stdin; only then do the lockers start, and the process
 * sleeps 1 s before it exits: a profiler that selects processes by a periodic scan and
 * prepares per-process state on a process's first event (native unwinding tables) can have
 * both in place before the contention, and the process is still there to be read when its
 * last waits are reported.
 * Usage: lock_contention THREADS ITERS HOLD_US [gate] */
#define _GNU_SOURCE
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_rwlock_t rwlock = PTHREAD_RWLOCK_INITIALIZER;
static int iters, hold_us;
static unsigned long long total_wait_ns, total_rw_wait_ns;
static pthread_mutex_t total_lock = PTHREAD_MUTEX_INITIALIZER;
static volatile unsigned long sink;

static pthread_mutex_t done_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cond = PTHREAD_COND_INITIALIZER;
static int done;
static sem_t done_sem;
static pid_t cond_tid, sem_tid;

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

__attribute__((noinline)) unsigned long long contend_rwlock(void)
{
    unsigned long long t0 = now_ns();
    pthread_rwlock_wrlock(&rwlock);
    unsigned long long waited = now_ns() - t0;
    hold_for(hold_us * 500ull);
    pthread_rwlock_unlock(&rwlock);
    return waited;
}

static void add_total(unsigned long long *total, unsigned long long mine)
{
    pthread_mutex_lock(&total_lock);
    *total += mine;
    pthread_mutex_unlock(&total_lock);
}

static void *worker(void *arg)
{
    (void)arg;
    unsigned long long mine = 0;
    for (int i = 0; i < iters; i++)
        mine += contend_lock();
    add_total(&total_wait_ns, mine);
    return NULL;
}

static void *rw_worker(void *arg)
{
    (void)arg;
    unsigned long long mine = 0;
    for (int i = 0; i < iters / 4; i++)
        mine += contend_rwlock();
    add_total(&total_rw_wait_ns, mine);
    return NULL;
}

__attribute__((noinline)) void wait_for_done(void)
{
    pthread_mutex_lock(&done_lock);
    while (!done)
        pthread_cond_wait(&done_cond, &done_lock);
    pthread_mutex_unlock(&done_lock);
}

static void *cond_waiter(void *arg)
{
    (void)arg;
    cond_tid = gettid();
    wait_for_done();
    return NULL;
}

__attribute__((noinline)) void wait_for_post(void)
{
    while (sem_wait(&done_sem) != 0)
        ;
}

static void *sem_waiter(void *arg)
{
    (void)arg;
    sem_tid = gettid();
    wait_for_post();
    return NULL;
}

static volatile int gate_open;

__attribute__((noinline)) void warm_up(void)
{
    sem_t never;
    sem_init(&never, 0, 0);
    while (!gate_open) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 50 * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec += 1;
            until.tv_nsec -= 1000000000L;
        }
        sem_timedwait(&never, &until);
    }
}

static void *warm_up_thread(void *arg)
{
    (void)arg;
    warm_up();
    return NULL;
}

__attribute__((noinline)) void join_all(pthread_t *threads, int n)
{
    for (int i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 4;
    iters = argc > 2 ? atoi(argv[2]) : 200;
    hold_us = argc > 3 ? atoi(argv[3]) : 2000;
    int gate = argc > 4 && strcmp(argv[4], "gate") == 0;
    if (gate) {
        pthread_t warmer;
        char line[16];
        pthread_create(&warmer, NULL, warm_up_thread, NULL);
        if (!fgets(line, sizeof line, stdin))
            return 1;
        gate_open = 1;
        join_all(&warmer, 1);
    }
    if (threads > 60)
        threads = 60;
    sem_init(&done_sem, 0, 0);
    pthread_t waiters[2], t[64];
    pthread_create(&waiters[0], NULL, cond_waiter, NULL);
    pthread_create(&waiters[1], NULL, sem_waiter, NULL);
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, worker, NULL);
    for (int i = threads; i < threads + 2; i++)
        pthread_create(&t[i], NULL, rw_worker, NULL);
    join_all(t, threads + 2);
    pthread_mutex_lock(&done_lock);
    done = 1;
    pthread_cond_signal(&done_cond);
    pthread_mutex_unlock(&done_lock);
    sem_post(&done_sem);
    join_all(waiters, 2);
    printf("wait_ns %llu\nrw_wait_ns %llu\nlocks %d\ncond_tid %d\nsem_tid %d\n", total_wait_ns, total_rw_wait_ns,
           threads * iters, (int)cond_tid, (int)sem_tid);
    fflush(stdout);
    if (gate)
        sleep(1);
    return 0;
}
