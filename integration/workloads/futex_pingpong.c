/* Two threads hand a turn back and forth through a condition variable, so both spend their
 * time in libc's futex wait helper and wake-ups, under start_thread:
 *     clone3 -> start_thread -> player -> pthread_cond_wait -> __futex_abstimed_wait_common
 * Run as several processes, the same code gives the same stacks in each.
 * Usage: futex_pingpong SECONDS. Prints "rounds <n>" at the end. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define NOINLINE __attribute__((noinline, noclone))

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t turn_changed = PTHREAD_COND_INITIALIZER;
static int turn;
static int done;
static long rounds;

NOINLINE static void *player(void *arg)
{
    int me = (int)(long)arg;
    pthread_mutex_lock(&lock);
    while (!done) {
        while (turn != me && !done)
            pthread_cond_wait(&turn_changed, &lock);
        turn = 1 - me;
        rounds++;
        pthread_cond_broadcast(&turn_changed);
    }
    pthread_mutex_unlock(&lock);
    return NULL;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 3.0;
    pthread_t threads[2];
    for (long i = 0; i < 2; i++)
        pthread_create(&threads[i], NULL, player, (void *)i);
    struct timespec pause = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    nanosleep(&pause, NULL);
    pthread_mutex_lock(&lock);
    done = 1;
    pthread_cond_broadcast(&turn_changed);
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < 2; i++)
        pthread_join(threads[i], NULL);
    printf("rounds %ld\n", rounds);
    return 0;
}
