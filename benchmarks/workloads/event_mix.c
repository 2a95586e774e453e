/* A busy host for the event-driven profile types (wall, lock), which counts its own events.
 *
 * Usage: event_mix SECONDS SPINNERS WAKERS WAKE_US PAIRS HOLD_US
 *   SECONDS 0 runs until SIGTERM or SIGINT.
 * - SPINNERS threads compute through 64 call paths (generated functions, recursion of
 *   varying depth), counting completed units of work;
 * - WAKERS threads sleep WAKE_US microseconds in a loop, counting wakeups;
 * - PAIRS pairs of threads hand a pthread mutex back and forth: each thread takes the
 *   mutex, holds it across a sleep of HOLD_US, releases it, sleeps HOLD_US / 2 and takes it
 *   again; by then the other thread holds it, so nearly every acquisition parks on the futex.
 * Timer slack is set to 1 ns so that the sleeps, and with them the event rates, follow the
 * arguments rather than the kernel's default 50 us rounding.
 *
 * Counts (cumulative, all threads):
 *   units        spinners' completed units of work
 *   wakeups      wakers' returns from their sleep
 *   acquisitions mutex acquisitions
 *   contended    acquisitions that found the mutex held (pthread_mutex_trylock failed)
 *   futex_waits  times a thread was parked inside pthread_mutex_lock: the voluntary context
 *                switches the kernel counted for the thread during that call
 *                (getrusage RUSAGE_THREAD), the only place the call sleeps is its futex wait;
 *                so a wait is counted only when the kernel really parked the thread
 * Once its threads run and its signal handlers are in place it prints "ready"; then each
 * SIGUSR1 prints one line "counts elapsed_ns=N units=N wakeups=N acquisitions=N contended=N
 * futex_waits=N" (elapsed on CLOCK_MONOTONIC since the start); the same line ends the run. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 256

struct counts {
    unsigned long long units, wakeups, acquisitions, contended, futex_waits;
} __attribute__((aligned(64)));

static struct counts per_thread[MAX_THREADS];
static volatile sig_atomic_t stop_requested, dump_requested;
static volatile int stop;
static volatile unsigned long long sink;
static long wake_us, hold_us;

#define DEF(n) __attribute__((noinline)) unsigned long f##n(int d, unsigned long x) \
    { if (d > 0) return f##n(d - 1, x * 31 + n); for (int i = 0; i < 200; i++) x = x * 1103515245u + 12345u; return x; }
DEF(0) DEF(1) DEF(2) DEF(3) DEF(4) DEF(5) DEF(6) DEF(7)
typedef unsigned long (*fn)(int, unsigned long);
static fn table[8] = {f0, f1, f2, f3, f4, f5, f6, f7};

static void bump(unsigned long long *counter, unsigned long long by)
{
    __atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + by, __ATOMIC_RELAXED);
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && !stop)
        ;
}

static long voluntary_switches(void)
{
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    return ru.ru_nvcsw;
}

struct worker {
    int slot;
    pthread_mutex_t *mutex;
};

static void *spinner(void *arg)
{
    struct worker *w = arg;
    unsigned seed = (unsigned)w->slot + 1;
    while (!stop) {
        seed = seed * 1664525u + 1013904223u;
        sink += table[seed % 8]((seed >> 8) % 8, seed);
        bump(&per_thread[w->slot].units, 1);
    }
    return NULL;
}

static void *waker(void *arg)
{
    struct worker *w = arg;
    while (!stop) {
        sleep_us(wake_us);
        bump(&per_thread[w->slot].wakeups, 1);
    }
    return NULL;
}

static void *mutex_handoff(void *arg)
{
    struct worker *w = arg;
    struct counts *c = &per_thread[w->slot];
    while (!stop) {
        if (pthread_mutex_trylock(w->mutex) != 0) {
            long before = voluntary_switches();
            pthread_mutex_lock(w->mutex);
            bump(&c->futex_waits, (unsigned long long)(voluntary_switches() - before));
            bump(&c->contended, 1);
        }
        bump(&c->acquisitions, 1);
        sleep_us(hold_us);
        pthread_mutex_unlock(w->mutex);
        sleep_us(hold_us / 2);
    }
    return NULL;
}

static void on_signal(int sig)
{
    if (sig == SIGUSR1)
        dump_requested = 1;
    else
        stop_requested = 1;
}

static long long elapsed_ns(const struct timespec *start)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - start->tv_sec) * 1000000000LL + (now.tv_nsec - start->tv_nsec);
}

static void print_counts(int nthreads, const struct timespec *start)
{
    struct counts total = {0};
    for (int i = 0; i < nthreads; i++) {
        total.units += __atomic_load_n(&per_thread[i].units, __ATOMIC_RELAXED);
        total.wakeups += __atomic_load_n(&per_thread[i].wakeups, __ATOMIC_RELAXED);
        total.acquisitions += __atomic_load_n(&per_thread[i].acquisitions, __ATOMIC_RELAXED);
        total.contended += __atomic_load_n(&per_thread[i].contended, __ATOMIC_RELAXED);
        total.futex_waits += __atomic_load_n(&per_thread[i].futex_waits, __ATOMIC_RELAXED);
    }
    printf("counts elapsed_ns=%lld units=%llu wakeups=%llu acquisitions=%llu contended=%llu futex_waits=%llu\n",
           elapsed_ns(start), total.units, total.wakeups, total.acquisitions, total.contended, total.futex_waits);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s SECONDS SPINNERS WAKERS WAKE_US PAIRS HOLD_US\n", argv[0]);
        return 2;
    }
    double seconds = atof(argv[1]);
    int spinners = atoi(argv[2]), wakers = atoi(argv[3]), pairs = atoi(argv[5]);
    wake_us = atol(argv[4]);
    hold_us = atol(argv[6]);
    if (spinners < 0 || wakers < 0 || pairs < 0 || spinners + wakers + 2 * pairs > MAX_THREADS
        || (wakers > 0 && wake_us <= 0) || (pairs > 0 && hold_us <= 0)) {
        fprintf(stderr, "bad arguments: at most %d threads, positive WAKE_US and HOLD_US where used\n",
                MAX_THREADS);
        return 2;
    }
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);  /* inherited by the threads created below */

    /* Workers block every signal: only this thread handles SIGUSR1/SIGTERM/SIGINT, so no
     * worker's sleep or futex wait is interrupted by the harness. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    static struct worker workers[MAX_THREADS];
    static pthread_mutex_t mutexes[MAX_THREADS / 2];
    pthread_t threads[MAX_THREADS];
    int n = 0;
    for (int i = 0; i < spinners; i++, n++) {
        workers[n] = (struct worker){n, NULL};
        pthread_create(&threads[n], NULL, spinner, &workers[n]);
    }
    for (int i = 0; i < wakers; i++, n++) {
        workers[n] = (struct worker){n, NULL};
        pthread_create(&threads[n], NULL, waker, &workers[n]);
    }
    for (int p = 0; p < pairs; p++) {
        pthread_mutex_init(&mutexes[p], NULL);
        for (int k = 0; k < 2; k++, n++) {
            workers[n] = (struct worker){n, &mutexes[p]};
            pthread_create(&threads[n], NULL, mutex_handoff, &workers[n]);
        }
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    printf("ready\n");
    fflush(stdout);
    while (!stop_requested && (seconds <= 0 || elapsed_ns(&start) < seconds * 1e9)) {
        struct timespec tick = {0, 10 * 1000 * 1000};
        nanosleep(&tick, NULL);
        if (dump_requested) {
            dump_requested = 0;
            print_counts(n, &start);
        }
    }
    stop = 1;
    for (int i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
    print_counts(n, &start);
    return 0;
}
