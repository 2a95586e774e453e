/* Heap workload with a known answer. After "go" on stdin:
 *  - keep_alive() allocates 64 MiB in 4096 blocks of 16 KiB and keeps them;
 *  - churn() allocates and frees at once ROUNDS x 64 blocks of sizes 64 B .. 16 KiB,
 *    counting the bytes itself, pausing 5 ms every 10 rounds (the sampled mode's records then
 *    come at a pace the agent's ring buffer absorbs, as in a program that does other work).
 * Prints "churn_bytes <n>" and then waits for "exit" (the live set stays live until then). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define KEEP_BLOCKS 4096
#define KEEP_SIZE (16 * 1024)

static void *kept[KEEP_BLOCKS];
static volatile unsigned long sink;

__attribute__((noinline)) void keep_alive(void)
{
    for (int i = 0; i < KEEP_BLOCKS; i++) {
        kept[i] = malloc(KEEP_SIZE);
        memset(kept[i], 1, 64);
    }
}

__attribute__((noinline)) unsigned long long churn(int rounds)
{
    unsigned long long bytes = 0;
    unsigned seed = 12345;
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < 64; i++) {
            seed = seed * 1103515245u + 12345u;
            size_t size = 64u << ((seed >> 16) % 9); /* 64 B .. 16 KiB */
            char *p = malloc(size);
            p[0] = (char)i;
            sink += p[0];
            free(p);
            bytes += size;
        }
        if (r % 10 == 9)
            usleep(5000);
    }
    return bytes;
}

int main(void)
{
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 1;
    keep_alive();
    unsigned long long churned = churn(1000);
    printf("churn_bytes %llu\n", churned);
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 1;
    for (int i = 0; i < KEEP_BLOCKS; i++)
        free(kept[i]);
    return 0;
}
