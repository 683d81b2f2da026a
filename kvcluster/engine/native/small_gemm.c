/* y[M, N] = x[M, K] @ W[K, N] for few rows M (decode), fp32, near memory bandwidth.
 *
 * W is packed once into column panels of P values, each streamed contiguously:
 *
 *   packed[N/P][K][P]:  panel j, row k = W[k, j*P .. j*P + P)   (last panel zero-padded)
 *
 * W is fp32 (sg_matmul) or bf16 (sg_matmul_bf16: half the bytes to stream; each
 * weight is widened to fp32 exactly, a 16-bit shift, and multiplied in fp32).
 * bf16 panels hold rows k and k+1 interleaved (the "VNNI" layout AMX reads):
 *
 *   packed[N/P][ceil(K/2)][P][2]:  [j][i][c] = (W[2i, jP + c], W[2i + 1, jP + c])
 *
 * (K odd: the last pair's second value is 0). One 32-bit word is a column's pair:
 * its low half shifted up is W[2i], its high half masked is W[2i + 1], so the
 * fp32 sums are the same, in the same order, as with plain rows.
 *
 * sg_matmul_bf16_amx multiplies bf16 rows x by the same bf16 panels on the AMX
 * tile unit (see small_gemm_amx.h), for the many-row matmuls of a prefill. Both
 * bf16-weight calls can write y in bf16 (y_bf16), rounded to nearest even as
 * torch's .to(torch.bfloat16) rounds, which saves the caller a pass over y.
 *
 * For each panel, up to RB rows of x are multiplied in one pass over the panel:
 * RB x P accumulators stay in registers, every weight is loaded once and used
 * RB times (x values are broadcast from memory). With M <= RB the weights
 * stream from memory exactly once; larger M takes more passes over a panel that
 * is by then in L2.
 *
 * Threads share the panels in chunks, claimed one at a time by the calling
 * thread and by helper threads it wakes (a small pool of our own, below).
 * The caller never waits for a helper that has not claimed a chunk: on a
 * busy machine a descheduled helper costs nothing and the caller does the
 * work itself. (OpenMP's fork-join made every call wait at its barrier for
 * the slowest thread: a long wait on 2 busy cores.)
 *
 * Compiled with -march=native on the machine that runs it: AVX-512 when the
 * CPU has it, else AVX2 (+FMA), else SSE; the vector width sets P and RB.
 */
#include <pthread.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16 /* floats per vector register */
#define RB 8  /* rows per pass: RB * NV accumulators + NV weights <= 32 registers */
#elif defined(__AVX2__)
#define VL 8
#define RB 4  /* 16 registers */
#else
#define VL 4
#define RB 4
#endif
#define NV 2 /* vectors per panel row */
#define K_BLOCK 64 /* rows of a panel summed before adding to the total */
#define MIN_SHARED_MACS (1L << 18) /* smaller matmuls: waking helpers costs more */
#define P (VL * NV)

typedef float vec __attribute__((vector_size(VL * 4)));
typedef int lanes __attribute__((vector_size(VL * 4)));
typedef unsigned short bf16_t;
typedef unsigned int words __attribute__((vector_size(VL * 4)));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

/* VL columns' bf16 pairs (2 VL values) -> their rows 2i and 2i + 1 in fp32, exactly:
 * bf16 is fp32's top half. */
static inline void load_bf16_pair(const bf16_t *p, vec *even, vec *odd) {
    words w;
    memcpy(&w, p, sizeof w);
    words lo = w << 16, hi = w & 0xffff0000u;
    memcpy(even, &lo, sizeof lo);
    memcpy(odd, &hi, sizeof hi);
}

static inline vec splat(float s) {
    return __builtin_shuffle((vec){s}, (lanes){0}); /* lane 0 everywhere: a broadcast */
}

/* acc[r] += x[r, i] * w for the R rows (an inlined helper of panel_rows). */
#define ACCUMULATE(i, w) \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) { \
        vec b = splat(x[r * ldx + (i)]); \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[r][v] += b * (w)[v]; \
    }

/* One pass over a panel for R rows (R and BF16 constants after inlining). */
static inline __attribute__((always_inline)) void panel_rows(
    int R, int BF16, const float *x, long ldx, const void *panel, long k,
    float *y, long ldy, long cols) {
    vec total[RB][NV] = {{{0}}};
    for (long i0 = 0; i0 < k; i0 += K_BLOCK) { /* blocked sums: rounding error ~ K_BLOCK + K / K_BLOCK */
        long i_end = i0 + K_BLOCK < k ? i0 + K_BLOCK : k;
        vec acc[RB][NV] = {{{0}}};
        if (BF16) { /* K_BLOCK is even: a block starts at a pair */
            for (long i = i0; i < i_end; i += 2) {
                vec even[NV], odd[NV];
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++)
                    load_bf16_pair((const bf16_t *)panel + i * P + v * 2 * VL, &even[v], &odd[v]);
                ACCUMULATE(i, even);
                if (i + 1 < i_end) ACCUMULATE(i + 1, odd); /* K odd: no x[k] to read */
            }
        } else {
            for (long i = i0; i < i_end; i++) {
                vec w[NV];
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++) w[v] = load((const float *)panel + i * P + v * VL);
                ACCUMULATE(i, w);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) total[r][v] += acc[r][v];
    }
    for (int r = 0; r < R; r++) {
        float out[P];
        memcpy(out, total[r], sizeof out);
        memcpy(y + r * ldy, out, (size_t)cols * sizeof(float)); /* the last panel is partial */
    }
}

#define PANEL_FN(R) \
    static void panel_##R(const float *x, long ldx, const void *p, long k, float *y, \
                          long ldy, long cols) { panel_rows(R, 0, x, ldx, p, k, y, ldy, cols); } \
    static void panel_bf16_##R(const float *x, long ldx, const void *p, long k, float *y, \
                               long ldy, long cols) { panel_rows(R, 1, x, ldx, p, k, y, ldy, cols); }
PANEL_FN(1) PANEL_FN(2) PANEL_FN(3) PANEL_FN(4)
#if RB == 8
PANEL_FN(5) PANEL_FN(6) PANEL_FN(7) PANEL_FN(8)
#endif

typedef void (*panel_fn)(const float *, long, const void *, long, float *, long, long);
static const panel_fn PANELS[2][RB] = {
    {panel_1, panel_2, panel_3, panel_4,
#if RB == 8
     panel_5, panel_6, panel_7, panel_8,
#endif
    },
    {panel_bf16_1, panel_bf16_2, panel_bf16_3, panel_bf16_4,
#if RB == 8
     panel_bf16_5, panel_bf16_6, panel_bf16_7, panel_bf16_8,
#endif
    },
};

/* One matmul, cut into chunks of panels. */
typedef struct {
    const void *x; /* fp32 rows, or bf16 rows for the AMX pass */
    const void *packed;
    void *y;       /* fp32, or bf16 with y_bf16 */
    long m, k, ldx, n, ldy, panels_per_chunk, num_chunks;
    int bf16;   /* packed holds bf16 weights */
    int amx;    /* x is bf16, multiplied on the AMX tiles */
    int y_bf16; /* y is written in bf16 */
} job_t;

/* dst[0 .. n) = src rounded to bf16, nearest even (NaN stays a quiet NaN), as torch
 * rounds; branch-free so the loop vectorises. */
static inline void store_bf16(bf16_t *dst, const float *src, long n) {
    for (long i = 0; i < n; i++) {
        unsigned u;
        memcpy(&u, &src[i], sizeof u);
        unsigned rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        dst[i] = (bf16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
    }
}

/* Row r of a panel's result (fp32 in out) into y at column col0. */
static inline void store_row(const job_t *job, long r, long col0, const float *out, long cols) {
    if (job->y_bf16)
        store_bf16((bf16_t *)job->y + r * job->ldy + col0, out, cols);
    else
        memcpy((float *)job->y + r * job->ldy + col0, out, (size_t)cols * sizeof(float));
}

#include "small_gemm_amx.h"

static void run_chunk(const job_t *job, long c);
static void share_chunks(const job_t *job, int num_helpers);

/* Columns per packed panel: the caller packs W with this width. */
int sg_panel_width(void) { return P; }

/* Rows done in one pass over the weights. */
int sg_rows_per_pass(void) { return RB; }

static void matmul(const void *x, long m, long k, long ldx, const void *packed, int bf16,
                   int amx, long n, void *y, long ldy, int y_bf16, int num_threads) {
    long num_panels = (n + P - 1) / P;
    if (num_threads < 1) num_threads = 1;
    /* ~8 chunks a thread: a descheduled helper holds up at most one chunk. */
    long per_chunk = num_panels / (8L * num_threads) + 1;
    job_t job = {x, packed, y, m, k, ldx, n, ldy, per_chunk,
                 (num_panels + per_chunk - 1) / per_chunk, bf16, amx, y_bf16};
    long helpers = num_threads - 1 < job.num_chunks - 1 ? num_threads - 1 : job.num_chunks - 1;
    if (helpers > 0 && m * k * n >= MIN_SHARED_MACS) {
        share_chunks(&job, (int)helpers);
        return;
    }
    for (long c = 0; c < job.num_chunks; c++) run_chunk(&job, c);
}

/* y[m, n] (row stride ldy) = x[m, k] (row stride ldx) @ W, W fp32 packed as above,
 * on up to num_threads threads (the caller's included). */
void sg_matmul(const float *x, long m, long k, long ldx, const float *packed, long n,
               float *y, long ldy, int num_threads) {
    matmul(x, m, k, ldx, packed, 0, 0, n, y, ldy, 0, num_threads);
}

/* The same with W packed in bf16 (x stays fp32; y fp32, or bf16 with y_bf16). */
void sg_matmul_bf16(const float *x, long m, long k, long ldx, const bf16_t *packed, long n,
                    void *y, long ldy, int num_threads, int y_bf16) {
    matmul(x, m, k, ldx, packed, 1, 0, n, y, ldy, y_bf16, num_threads);
}

/* bf16 rows x (row stride ldx) @ W bf16-packed, on the AMX tiles; K a multiple of
 * sg_amx_k_multiple() and sg_amx_available() true (the caller checks both). */
void sg_matmul_bf16_amx(const bf16_t *x, long m, long k, long ldx, const bf16_t *packed,
                        long n, void *y, long ldy, int num_threads, int y_bf16) {
    matmul(x, m, k, ldx, packed, 1, 1, n, y, ldy, y_bf16, num_threads);
}

static void run_chunk(const job_t *job, long c) {
    long num_panels = (job->n + P - 1) / P, j0 = c * job->panels_per_chunk;
    long j1 = j0 + job->panels_per_chunk < num_panels ? j0 + job->panels_per_chunk : num_panels;
#if HAVE_AMX
    if (job->amx) {
        amx_chunk(job, j0, j1);
        return;
    }
#endif
    /* bf16 panels hold ceil(K / 2) pairs of rows */
    size_t panel_bytes = job->bf16 ? (size_t)((job->k + 1) / 2 * 2 * P) * sizeof(bf16_t)
                                   : (size_t)(job->k * P) * sizeof(float);
    const float *x = job->x;
    float out[RB * P]; /* a pass's results, then stored (rounded) into y */
    for (long j = j0; j < j1; j++) {
        const char *panel = (const char *)job->packed + (size_t)j * panel_bytes;
        long cols = job->n - j * P < P ? job->n - j * P : P;
        for (long r0 = 0; r0 < job->m; r0 += RB) {
            long rows = job->m - r0 < RB ? job->m - r0 : RB;
            PANELS[job->bf16][rows - 1](x + r0 * job->ldx, job->ldx, panel, job->k, out, P, cols);
            for (long r = 0; r < rows; r++) store_row(job, r0 + r, j * P, out + r * P, cols);
        }
    }
}

/* ------------------------------------------------------------- helper threads
 * One job at a time (a second concurrent caller runs alone). Publishing a job
 * bumps the generation; chunks are claimed by compare-and-swap on a ticket
 * (generation << 32 | next chunk), so a helper still holding an older job
 * can never claim a chunk of a newer one. The caller returns when every
 * chunk is done; all claimed chunks finish before that, so no helper touches
 * a job's buffers after its caller returned.
 */
#define MAX_HELPERS 63
#define HELPER_SPINS 2000

static struct {
    pthread_mutex_t busy; /* held by the one caller using the helpers */
    pthread_mutex_t lock; /* guards job, generation, participants */
    pthread_cond_t wake;
    job_t job;
    unsigned generation;
    int participants, num_helpers;
    _Atomic unsigned long ticket;
    _Atomic long done;
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER};

static void claim_and_run(const job_t *job, unsigned generation) {
    unsigned long t = atomic_load(&pool.ticket);
    while ((unsigned)(t >> 32) == generation && (long)(t & 0xffffffffUL) < job->num_chunks) {
        if (!atomic_compare_exchange_weak(&pool.ticket, &t, t + 1)) continue; /* t reloaded */
        run_chunk(job, (long)(t & 0xffffffffUL));
        atomic_fetch_add(&pool.done, 1);
        t = atomic_load(&pool.ticket);
    }
}

static void *helper_main(void *arg) {
    int id = (int)(long)arg;
    pthread_mutex_lock(&pool.lock);
    unsigned seen = pool.generation;
    for (;;) {
        if (pool.generation == seen) { /* the next matmul often follows within microseconds */
            pthread_mutex_unlock(&pool.lock);
            for (int i = 0; i < HELPER_SPINS; i++) { /* ~50 us */
                if ((unsigned)(atomic_load(&pool.ticket) >> 32) != seen) break;
                __builtin_ia32_pause();
            }
            pthread_mutex_lock(&pool.lock);
        }
        while (pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        job_t job = pool.job;
        int joins = id < pool.participants;
        pthread_mutex_unlock(&pool.lock);
        if (joins) claim_and_run(&job, seen);
        pthread_mutex_lock(&pool.lock);
    }
    return NULL;
}

static void reset_after_fork(void) { /* the child has none of the helper threads */
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.num_helpers = 0;
}

__attribute__((constructor)) static void on_load(void) {
    pthread_atfork(NULL, NULL, reset_after_fork);
}

static int start_helpers(int wanted) {
    if (wanted > MAX_HELPERS) wanted = MAX_HELPERS;
    while (pool.num_helpers < wanted) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper_main, (void *)(long)pool.num_helpers) != 0) break;
        pthread_detach(thread);
        pool.num_helpers++;
    }
    return pool.num_helpers < wanted ? pool.num_helpers : wanted;
}

static void share_chunks(const job_t *job, int num_helpers) {
    if (pthread_mutex_trylock(&pool.busy) != 0) { /* another caller has the helpers */
        for (long c = 0; c < job->num_chunks; c++) run_chunk(job, c);
        return;
    }
    num_helpers = start_helpers(num_helpers);
    pthread_mutex_lock(&pool.lock);
    unsigned generation = ++pool.generation;
    pool.job = *job;
    pool.participants = num_helpers;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.ticket, (unsigned long)generation << 32);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    claim_and_run(job, generation);
    for (int spins = 0; atomic_load(&pool.done) < job->num_chunks; spins++) {
        if (spins < 4096) __builtin_ia32_pause(); /* a helper is finishing a chunk */
        else sched_yield();
    }
    pthread_mutex_unlock(&pool.busy);
}
