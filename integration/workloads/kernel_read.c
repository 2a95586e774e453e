/* CPU workload with samples in both modes: the main thread reads /dev/zero in 1 MiB chunks
 * (main -> read_loop -> read(2): most of its CPU time is the kernel zeroing the buffer), and
 * a second thread spins in user space (run_spinner -> spin_leaf), never entering the kernel
 * on purpose. Usage: kernel_read SECONDS. */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile double sink;
static double seconds;
static char buffer[1 << 20];

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void spin_leaf(double until)
{
    double x = 1.0;
    while (now() < until) {
        for (int i = 0; i < 20000; i++)
            x = x * 1.0000001 + 0.0000001;
        sink = x;
    }
}

static void *run_spinner(void *arg)
{
    (void)arg;
    spin_leaf(now() + seconds);
    return NULL;
}

__attribute__((noinline)) long read_loop(int fd, double until)
{
    long total = 0;
    while (now() < until) {
        ssize_t n = read(fd, buffer, sizeof(buffer));
        if (n <= 0)
            return -1;
        total += n;
    }
    return total;
}

int main(int argc, char **argv)
{
    seconds = argc > 1 ? atof(argv[1]) : 5;
    int fd = open("/dev/zero", O_RDONLY);
    if (fd < 0)
        return 1;
    pthread_t spinner;
    pthread_create(&spinner, NULL, run_spinner, NULL);
    long total = read_loop(fd, now() + seconds);
    pthread_join(spinner, NULL);
    printf("%ld\n", total);
    return total < 0;
}
