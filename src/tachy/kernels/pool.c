/* A small thread pool for tachy's kernels: the caller and (threads - 1) workers split [0, n) in chunks.

Workers spin briefly between jobs (a decode step runs hundreds of short jobs back to back), then sleep. One
job runs at a time; callers from several threads take turns. A forked child starts without workers.
*/
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

static struct {
    pthread_t tid[63];
    int workers;                 /* started worker threads */
    int active;                  /* threads taking part in the current job (caller included) */
    task_fn fn;
    void *args;
    int64_t n, grain;
    int dynamic;                 /* chunks handed out one at a time (tq_parallel_for_dynamic) */
    atomic_long next;            /* the next chunk to hand out */
    atomic_long generation;      /* bumped to start a job */
    atomic_int pending;          /* workers still running the current job */
    pthread_mutex_t lock;
    pthread_cond_t wake;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static int requested_threads = 1;

static void run_share(int index, int parts) {
    int64_t chunks = (pool.n + pool.grain - 1) / pool.grain;
    if (pool.dynamic) {
        for (int64_t c; (c = atomic_fetch_add_explicit(&pool.next, 1, memory_order_relaxed)) < chunks;)
            pool.fn(pool.args, c * pool.grain, (c + 1) * pool.grain < pool.n ? (c + 1) * pool.grain : pool.n);
        return;
    }
    int64_t c0 = chunks * index / parts, c1 = chunks * (index + 1) / parts;
    int64_t begin = c0 * pool.grain, end = c1 * pool.grain < pool.n ? c1 * pool.grain : pool.n;
    if (begin < end) pool.fn(pool.args, begin, end);
}

typedef struct { int index; long generation; } worker_start;

static void *worker_main(void *arg) {
    worker_start start = *(worker_start *)arg;  /* index 1 .. workers; the generation it was started at */
    free(arg);
    int index = start.index;
    long seen = start.generation;
    for (;;) {
        long g;
        int spins = 0;
        while ((g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen) {
            if (++spins < 20000) {
#if defined(__x86_64__)
                __builtin_ia32_pause();
#endif
                continue;
            }
            pthread_mutex_lock(&pool.lock);
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = g;
        if (index < pool.active) run_share(index, pool.active);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

void tq_set_threads(int n) { requested_threads = n < 1 ? 1 : (n > 64 ? 64 : n); }
int tq_get_threads(void) { return requested_threads; }

static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;   /* one job at a time (callers from threads) */

static void forget_workers(void) {       /* a forked child has none of its parent's threads */
    pool.workers = 0;
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_mutex_init(&job_lock, NULL);
}

static void parallel_for_locked(task_fn fn, void *args, int64_t n, int64_t grain, int dynamic);

static void parallel_for(task_fn fn, void *args, int64_t n, int64_t grain, int dynamic) {
    static int atfork_set = 0;
    pthread_mutex_lock(&job_lock);
    if (!atfork_set) {
        pthread_atfork(NULL, NULL, forget_workers);
        atfork_set = 1;
    }
    parallel_for_locked(fn, args, n, grain, dynamic);
    pthread_mutex_unlock(&job_lock);
}

/* Equal shares of [0, n): for work of even cost per item (matrix rows, tokens). */
void tq_parallel_for(task_fn fn, void *args, int64_t n, int64_t grain) { parallel_for(fn, args, n, grain, 0); }

/* Chunks handed out in order to whichever thread is free: for items of uneven cost (a causal prompt's later
   tokens see more keys), where equal shares leave one thread waiting for the other. Each chunk's results must
   not depend on the thread that runs it. */
void tq_parallel_for_dynamic(task_fn fn, void *args, int64_t n, int64_t grain) {
    parallel_for(fn, args, n, grain, 1);
}

static void parallel_for_locked(task_fn fn, void *args, int64_t n, int64_t grain, int dynamic) {
    int parts = requested_threads;
    int64_t chunks = (n + grain - 1) / grain;
    if (parts > chunks) parts = (int)chunks;
    if (parts <= 1) {
        if (n > 0) fn(args, 0, n);
        return;
    }
    while (pool.workers < parts - 1) {          /* start workers on first use */
        worker_start *start = malloc(sizeof(worker_start));
        start->index = pool.workers + 1;
        start->generation = atomic_load(&pool.generation);
        pthread_create(&pool.tid[pool.workers], NULL, worker_main, start);
        pool.workers++;
    }
    pool.fn = fn;
    pool.args = args;
    pool.n = n;
    pool.grain = grain;
    pool.dynamic = dynamic;
    atomic_store(&pool.next, 0);
    pool.active = parts;
    atomic_store(&pool.pending, pool.workers);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    run_share(0, parts);
    /* wait for the workers: spin briefly, then give the core away between checks (a worker that the OS
       descheduled for another thread, a server's event loop or a client on the same cores, needs it back) */
    for (int spins = 0; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0;) {
        if (++spins < 2000) {
#if defined(__x86_64__)
            __builtin_ia32_pause();
#endif
        } else {
            sched_yield();
        }
    }
}

