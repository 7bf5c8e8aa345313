/* The gpu-check workload: CUDA runtime calls in exact, known numbers, linked against
 * libcudart.so. On a GPU machine: `nvcc -cudart shared` (a real kernel, really launched);
 * elsewhere the same file is C (`gcc -x c`) linked against the test double of libcudart.
 * The runner names the binary like an LLM server so that llmscope tracks it.
 *
 *   MODE=counts  ALLOCS allocations of ALLOC_BYTES, one kernel launch on each of LAUNCHES
 *                iterations, H2D/D2H/D2D copies of COPY_BYTES (H2D_COPIES, D2H_COPIES,
 *                D2D_COPIES of them), SYNCS device synchronisations, every allocation freed
 *                (unless NO_FREE=1: the memory stays held until the process ends)
 *   MODE=oom     one allocation of OOM_BYTES (more than any GPU has): it must fail
 *   MODE=bench   launch-bound: SECONDS of back-to-back launches, a synchronisation every
 *                32; prints the launches per second
 *
 * Prints "ready" once the library is loaded, waits for a line on stdin, runs the plan,
 * prints "done errors=<n> first_error=<code> [per_second=<x>]", then waits for stdin to close. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef __CUDACC__
__global__ void tick(int *counter) { atomicAdd(counter, 1); }
#else
/* The runtime API as libcudart.so exports it (no CUDA headers where there is no CUDA). */
typedef int cudaError_t;
typedef struct { unsigned x, y, z; } dim3;
cudaError_t cudaMalloc(void **ptr, size_t size);
cudaError_t cudaFree(void *ptr);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, int kind);
cudaError_t cudaLaunchKernel(const void *func, dim3 grid, dim3 block, void **args, size_t shmem, void *stream);
cudaError_t cudaDeviceSynchronize(void);
static void tick(int *counter) { (void)counter; }
#endif

enum { H2D = 1, D2H = 2, D2D = 3 };

static long env(const char *name, long fallback) {
    const char *v = getenv(name);
    return v ? atol(v) : fallback;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long errors;
static int first_error;

static void check(cudaError_t rc) {
    if (rc != 0) {
        if (!errors)
            first_error = (int)rc;
        errors++;
    }
}

static cudaError_t launch(int *counter) {
    void *args[] = {&counter};
    dim3 grid = {1, 1, 1}, block = {32, 1, 1};
    return cudaLaunchKernel((const void *)tick, grid, block, args, 0, NULL);
}

static void counts(void) {
    long allocs = env("ALLOCS", 8), launches = env("LAUNCHES", 1000), syncs = env("SYNCS", 10);
    size_t bytes = (size_t)env("ALLOC_BYTES", 1 << 20), copy = (size_t)env("COPY_BYTES", 65536);
    void **ptrs = (void **)calloc(allocs, sizeof(void *));
    char *host = (char *)calloc(1, copy);
    for (long i = 0; i < allocs; i++)
        check(cudaMalloc(&ptrs[i], bytes));
    for (long i = 0; i < env("H2D_COPIES", 3); i++)
        check(cudaMemcpy(ptrs[0], host, copy, H2D));
    for (long i = 0; i < env("D2H_COPIES", 2); i++)
        check(cudaMemcpy(host, ptrs[0], copy, D2H));
    for (long i = 0; i < env("D2D_COPIES", 1); i++)
        check(cudaMemcpy(ptrs[allocs > 1 ? 1 : 0], ptrs[0], copy, D2D));
    for (long i = 0; i < launches; i++)
        check(launch((int *)ptrs[0]));
    for (long i = 0; i < syncs; i++)
        check(cudaDeviceSynchronize());
    for (long i = 0; i < allocs && !env("NO_FREE", 0); i++)
        check(cudaFree(ptrs[i]));
    free(ptrs);
    free(host);
    printf("done errors=%ld first_error=%d\n", errors, first_error);
}

static void oom(void) {
    void *ptr = NULL;
    check(cudaMalloc(&ptr, (size_t)env("OOM_BYTES", 1L << 46)));
    printf("done errors=%ld first_error=%d\n", errors, first_error);
}

static void bench(void) {
    void *counter = NULL;
    check(cudaMalloc(&counter, 4096));
    double seconds = (double)env("SECONDS", 5), start = now(), end = start + seconds;
    long n = 0;
    while (now() < end) {
        for (int i = 0; i < 32; i++)
            check(launch((int *)counter));
        check(cudaDeviceSynchronize());
        n += 32;
    }
    double per_second = n / (now() - start);
    check(cudaFree(counter));
    printf("done errors=%ld first_error=%d per_second=%.1f\n", errors, first_error, per_second);
}

int main(void) {
    char line[64];
    const char *mode = getenv("MODE") ? getenv("MODE") : "counts";
    /* The library is loaded (linked): the probes can attach before any call. */
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 1;
    if (!strcmp(mode, "oom"))
        oom();
    else if (!strcmp(mode, "bench"))
        bench();
    else
        counts();
    fflush(stdout);
    while (fgets(line, sizeof line, stdin))
        ;
    return errors && strcmp(mode, "oom") ? 1 : 0;
}
