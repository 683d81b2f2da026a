/* The AMX pass of small_gemm.c: bf16 rows x bf16 panels on the tile unit.
 *
 * Included by small_gemm.c (native.py hashes included files into the build's name).
 * A prefill's tail multiplies tens of rows by every weight: on the FMA units that
 * costs a pass per RB rows, while one TDPBF16PS does 16 x 16 x 32 products. The
 * panels are already in the pair ("VNNI") layout a B tile reads:
 *
 *   tile B (16 pair rows x 16 columns):  pair row i of a panel, columns c0 .. c0 + 15,
 *   i.e. 64 bytes at panel + i * 2P + 2 c0 (bf16 units), rows 2P * 2 bytes apart
 *   tile A (up to 16 rows x 32 values):  x[r, k0 .. k0 + 31], rows ldx * 2 bytes apart
 *   tile C (the same rows x 16 columns): fp32 sums, C += A . B over pairs
 *
 * Tiles 0-3 are C (two row blocks of 16 x the panel's two column halves), 4-5 A
 * (the two row blocks), 6-7 B (the two column halves): a pass covers 32 rows and
 * loads each weight once for them. K must be a multiple of AMX_K (the caller
 * checks, via sg_amx_k_multiple). Linux grants the tile state on request
 * (arch_prctl ARCH_REQ_XCOMP_PERM); without it sg_amx_available() is 0.
 */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#include <sys/syscall.h>
#include <unistd.h>

#if P != 32
#error "the AMX pass assumes 32-column panels (two B tiles)"
#endif
#define AMX_ROWS 16        /* rows of an A or C tile */
#define AMX_K 32           /* bf16 values of K in one A tile row (64 bytes) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    unsigned char palette, start_row, reserved[14];
    unsigned short colsb[16];
    unsigned char rows[16];
} tile_config_t;

static int amx_state = -1; /* -1 unknown, 0 refused, 1 granted (to the whole process) */

int sg_amx_available(void) {
    if (amx_state < 0)
        amx_state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_state;
}

int sg_amx_k_multiple(void) { return AMX_K; }

/* This thread's tiles for a pass of m0 (1..16) + m1 (0..16) rows. */
static void amx_configure(long m0, long m1) {
    tile_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64;
    cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = (unsigned char)m0;
    cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = (unsigned char)m1;
    if (m1 == 0) cfg.colsb[2] = cfg.colsb[3] = cfg.colsb[5] = 0; /* unused */
    cfg.rows[6] = cfg.rows[7] = 16;
    _tile_loadconfig(&cfg);
}

/* Rows r0 .. r0 + m0 + m1 of y, panel j's columns = x rows @ the panel, with the
 * tiles as configured. */
static void amx_panel(const job_t *job, long r0, long m0, long m1, long j) {
    const bf16_t *x = (const bf16_t *)job->x + r0 * job->ldx;
    const bf16_t *panel = (const bf16_t *)job->packed + j * job->k * P; /* K is even */
    long ldx = job->ldx, k = job->k, cols = job->n - j * P < P ? job->n - j * P : P;
    _tile_zero(0);
    _tile_zero(1);
    if (m1) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (long k0 = 0; k0 < k; k0 += AMX_K) {
        const bf16_t *b = panel + k0 * P; /* pair row k0 / 2 */
        _tile_loadd(6, b, 2 * P * sizeof(bf16_t));
        _tile_loadd(7, b + P, 2 * P * sizeof(bf16_t)); /* columns 16 .. 31 */
        _tile_loadd(4, x + k0, ldx * sizeof(bf16_t));
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (m1) {
            _tile_loadd(5, x + AMX_ROWS * ldx + k0, ldx * sizeof(bf16_t));
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    float out[2 * AMX_ROWS][P];
    _tile_stored(0, out[0], P * sizeof(float));
    _tile_stored(1, out[0] + P / 2, P * sizeof(float));
    if (m1) {
        _tile_stored(2, out[AMX_ROWS], P * sizeof(float));
        _tile_stored(3, out[AMX_ROWS] + P / 2, P * sizeof(float));
    }
    for (long r = 0; r < m0 + m1; r++) store_row(job, r0 + r, j * P, out[r], cols);
}

/* Every row of x against panels [j0, j1): passes of up to 32 rows. */
static void amx_chunk(const job_t *job, long j0, long j1) {
    for (long r0 = 0; r0 < job->m; r0 += 2 * AMX_ROWS) {
        long rows = job->m - r0 < 2 * AMX_ROWS ? job->m - r0 : 2 * AMX_ROWS;
        long m0 = rows < AMX_ROWS ? rows : AMX_ROWS;
        amx_configure(m0, rows - m0);
        for (long j = j0; j < j1; j++) amx_panel(job, r0, m0, rows - m0, j);
    }
    _tile_release(); /* no tile state kept across context switches */
}
#define HAVE_AMX 1
#else
int sg_amx_available(void) { return 0; }
int sg_amx_k_multiple(void) { return 32; }
#define HAVE_AMX 0
#endif
