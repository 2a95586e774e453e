/* Two loops that time one kernel event each, for benchmarks/tracepoint_tax.py.
 *
 *   event_tax syscalls N   N getppid() system calls in a row
 *   event_tax switches N   two processes pinned to one CPU hand a byte back and forth
 *                          through two pipes, N times each way: every hand-off is one
 *                          context switch
 *
 * Prints the mean nanoseconds per event on the program's own monotonic clock; exits non-zero
 * (printing nothing) if a step fails. Each side closes the pipe ends it does not use, so if
 * the other side dies its read sees end-of-file instead of blocking for ever.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
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

/* Pin this process (and the child it forks) to the first CPU it may run on. */
static int pin_to_one_cpu(void)
{
    cpu_set_t allowed, one;
    if (sched_getaffinity(0, sizeof(allowed), &allowed))
        return -1;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (CPU_ISSET(cpu, &allowed)) {
            CPU_ZERO(&one);
            CPU_SET(cpu, &one);
            return sched_setaffinity(0, sizeof(one), &one);
        }
    }
    return -1;
}

static double switches(long n)
{
    int there[2], back[2];
    char byte = 0;
    if (pin_to_one_cpu() || pipe(there) || pipe(back))
        return -1;
    pid_t child = fork();
    if (child < 0)
        return -1;
    if (child == 0) {
        close(there[1]);
        close(back[0]);
        for (long i = 0; i < n; i++)
            if (read(there[0], &byte, 1) != 1 || write(back[1], &byte, 1) != 1)
                _exit(1);
        _exit(0);
    }
    close(there[0]);
    close(back[1]);
    double start = now_ns();
    long i = 0;
    while (i < n && write(there[1], &byte, 1) == 1 && read(back[0], &byte, 1) == 1)
        i++;
    double per = (now_ns() - start) / (2.0 * n);
    if (i < n)
        kill(child, SIGKILL);
    int status = 0;
    if (waitpid(child, &status, 0) != child)
        return -1;
    return i == n && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? per : -1;
}

int main(int argc, char **argv)
{
    long n = argc == 3 ? atol(argv[2]) : 0;
    if (n <= 0) {
        fprintf(stderr, "usage: %s syscalls|switches N (N > 0)\n", argv[0]);
        return 2;
    }
    double per = strcmp(argv[1], "syscalls") == 0 ? syscalls(n) : strcmp(argv[1], "switches") == 0 ? switches(n) : -1;
    if (per < 0) {
        fprintf(stderr, "%s: failed\n", argv[1]);
        return 1;
    }
    printf("%.2f\n", per);
    return 0;
}
