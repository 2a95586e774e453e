/* Two loops that time one kernel event each, for benchmarks/tracepoint_tax.py.
 *
 *   event_tax syscalls N   N getppid() system calls in a row
 *   event_tax switches N   two processes pinned to one CPU hand a byte back and forth
 *                          through two pipes, N times each way: every hand-off is one
 *                          context switch
 *
 * Prints the mean nanoseconds per event on the program's own monotonic clock.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static double syscalls(long n)
{
    double start = now_ns();
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    return (now_ns() - start) / n;
}

static double switches(long n)
{
    int there[2], back[2];
    char byte = 0;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(0, &one);
    if (pipe(there) || pipe(back) || sched_setaffinity(0, sizeof(one), &one))
        return -1;
    pid_t child = fork();
    if (child == 0) {
        for (long i = 0; i < n; i++)
            if (read(there[0], &byte, 1) != 1 || write(back[1], &byte, 1) != 1)
                _exit(1);
        _exit(0);
    }
    double start = now_ns();
    for (long i = 0; i < n; i++)
        if (write(there[1], &byte, 1) != 1 || read(back[0], &byte, 1) != 1)
            return -1;
    double per = (now_ns() - start) / (2.0 * n);
    int status = 0;
    waitpid(child, &status, 0);
    return status == 0 ? per : -1;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s syscalls|switches N\n", argv[0]);
        return 2;
    }
    long n = atol(argv[2]);
    double per = strcmp(argv[1], "syscalls") == 0 ? syscalls(n) : strcmp(argv[1], "switches") == 0 ? switches(n) : -1;
    if (per < 0 || n <= 0) {
        fprintf(stderr, "%s: failed\n", argv[1]);
        return 1;
    }
    printf("%.2f\n", per);
    return 0;
}
