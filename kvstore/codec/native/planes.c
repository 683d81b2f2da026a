/* Row passes of the level codecs over planes [P, T, C], one pass each, in C.
 *
 * The torch twins (quantize.py, transform.KVTransform) make several passes
 * over ~12M elements per 1024-token chunk: int8 -> float32, the reference
 * fix-ups, RoPE through a swapped copy, dtype conversions on each side of the
 * basis matmul, and amax / amin / divide / round / clamp / cast to quantize.
 * Here each row is built in a small float buffer that stays in L1 and is
 * written once, in the dtype the next stage wants (the time it saves per chunk:
 * docs/codec.md, "Measurements behind the code").
 *
 * Results match the torch twins bit for bit on the torch build we pin: the same
 * float32 operations in the same order, fused where torch's vectorised addcmul
 * fuses (its multiply-add is an FMA there: fmaf here) and nowhere else
 * (-ffp-contract=off), and round-to-nearest-even conversions to bf16 and fp16.
 *
 * Element kinds: 0 float32, 1 bfloat16, 2 float16 (IEEE half).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2 };
enum { REF_ZERO = 0, REF_MEAN = 1, REF_ANCHOR = 2 };
#define MAX_CHANNELS 8192

static const long ELEMENT_BYTES[3] = {4, 2, 2};

/* The longest row (C = kv_heads * head_dim) the kernels' stack buffers hold. */
long kv_max_channels(void) { return MAX_CHANNELS; }

/* ------------------------------------------------------------ conversions */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; inputs are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if !defined(__F16C__)
static float f16_to_f32_soft(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else { /* subnormal half: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t f32_to_f16_soft(float f) { /* round to nearest even, overflow to inf */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0));
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* rounds past 65504 */
    if (a < 0x38800000u) { /* subnormal or zero half */
        if (a < 0x33000000u) return (uint16_t)sign;
        uint32_t man = (a & 0x7FFFFFu) | 0x800000u, shift = 126 - (a >> 23);
        uint32_t half = man >> shift, rest = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rest > mid || (rest == mid && (half & 1u))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = ((a >> 13) - (112u << 10));
    uint32_t rest = a & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}
#endif

static void load_row(const void *src, int kind, float *restrict dst, long n) {
    if (kind == KIND_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (kind == KIND_BF16) {
        const uint16_t *s = src;
        for (long i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        const uint16_t *s = src;
        long i = 0;
#if defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
        for (; i < n; i++) dst[i] = _cvtsh_ss(s[i]);
#else
        for (; i < n; i++) dst[i] = f16_to_f32_soft(s[i]);
#endif
    }
}

static void store_row(const float *restrict src, void *dst, int kind, long n) {
    if (kind == KIND_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (kind == KIND_BF16) {
        uint16_t *d = dst;
        for (long i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        uint16_t *d = dst;
        long i = 0;
#if defined(__F16C__)
        const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), mode));
        for (; i < n; i++) d[i] = _cvtss_sh(src[i], mode);
#else
        for (; i < n; i++) d[i] = f32_to_f16_soft(src[i]);
#endif
    }
}

/* ------------------------------------------------------------ dequantize */

/* Planes from symbols, as quantize.dequantize: row (p, t) is
 *     ZERO    s * step            MEAN    mu[p] + s * step
 *     ANCHOR  xhat[p, anchor(t)] + s * step      (anchor(t) = t - t % group)
 * with s = symbols[where[p * T + t]] (the stream's row order). Returns 0, or -1
 * when an anchor row refers to an anchor or a ref is unknown (nothing sensible
 * to decode; the caller raises). `where` must index rows of `symbols`.
 */
int kv_dequantize(const int8_t *symbols, const int64_t *where, const float *mu,
                  const float *steps, const uint8_t *refs, long planes, long tokens,
                  long channels, long group, void *out, int kind) {
    if (channels > MAX_CHANNELS || group < 1) return -1;
    float row[MAX_CHANNELS], anchor[MAX_CHANNELS];
    char *dst = out;
    long row_bytes = channels * ELEMENT_BYTES[kind];
    for (long p = 0; p < planes; p++) {
        const float *m = mu + p * channels;
        for (long t = 0; t < tokens; t++) {
            long r = p * tokens + t;
            const int8_t *restrict s = symbols + where[r] * channels;
            float step = steps[r];
            int is_anchor = t % group == 0;
            switch (refs[r]) {
            case REF_ZERO:
                for (long c = 0; c < channels; c++) row[c] = (float)s[c] * step;
                break;
            case REF_MEAN:
                for (long c = 0; c < channels; c++) row[c] = fmaf((float)s[c], step, m[c]);
                break;
            case REF_ANCHOR:
                if (is_anchor) return -1;
                for (long c = 0; c < channels; c++) row[c] = fmaf((float)s[c], step, anchor[c]);
                break;
            default:
                return -1;
            }
            if (is_anchor) memcpy(anchor, row, (size_t)channels * 4);
            store_row(row, dst + r * row_bytes, kind, channels);
        }
    }
    return 0;
}

/* ------------------------------------------------------------ RoPE and casts */

/* Planes [P, T, C] of kind `src_kind` -> kind `dst_kind`; when `cos` is not NULL,
 * the key planes (even p) are also turned by RoPE, as transform.rotate_keys:
 *     y = x * cos + swap_halves(x) * sin      per head of `head_dim`
 * with tables cos, sin [T, C] (the sign of sin picks the direction). Returns 0,
 * or -1 for a shape the buffers cannot hold.
 */
int kv_convert_planes(const void *src, int src_kind, void *dst, int dst_kind, long planes,
                      long tokens, long channels, long head_dim, const float *cos,
                      const float *sin) {
    if (channels > MAX_CHANNELS || head_dim < 2 || head_dim % 2 || channels % head_dim) return -1;
    float x[MAX_CHANNELS], y[MAX_CHANNELS];
    const char *in = src;
    char *out = dst;
    long in_bytes = channels * ELEMENT_BYTES[src_kind], out_bytes = channels * ELEMENT_BYTES[dst_kind];
    long half = head_dim / 2;
    for (long p = 0; p < planes; p++) {
        int rope = cos != NULL && p % 2 == 0;
        for (long t = 0; t < tokens; t++) {
            long r = p * tokens + t;
            load_row(in + r * in_bytes, src_kind, x, channels);
            if (!rope) {
                store_row(x, out + r * out_bytes, dst_kind, channels);
                continue;
            }
            const float *restrict c = cos + t * channels, *restrict s = sin + t * channels;
            for (long h = 0; h < channels; h += head_dim) {
                for (long i = h; i < h + half; i++) y[i] = fmaf(x[i + half], s[i], x[i] * c[i]);
                for (long i = h + half; i < h + head_dim; i++) y[i] = fmaf(x[i - half], s[i], x[i] * c[i]);
            }
            store_row(y, out + r * out_bytes, dst_kind, channels);
        }
    }
    return 0;
}

/* ------------------------------------------------------------ quantize */

#if defined(__AVX512F__)
#define QVL 16
typedef __m512 qvec;
#define q_load _mm512_loadu_ps
#define q_set1 _mm512_set1_ps
#define q_abs _mm512_abs_ps
#define q_max _mm512_max_ps
#define q_min _mm512_min_ps
#define q_div _mm512_div_ps
#define q_round(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline float q_hmax(qvec v) { return _mm512_reduce_max_ps(v); }
static inline int q_any_nan(qvec v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
static inline void q_store_i8(int8_t *out, qvec v) { /* v integral in [-127, 127] */
    _mm_storeu_si128((__m128i *)out, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
}
#elif defined(__AVX2__)
#define QVL 8
typedef __m256 qvec;
#define q_load _mm256_loadu_ps
#define q_set1 _mm256_set1_ps
#define q_abs(v) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)
#define q_max _mm256_max_ps
#define q_min _mm256_min_ps
#define q_div _mm256_div_ps
#define q_round(v) _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline float q_hmax(qvec v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
static inline int q_any_nan(qvec v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
static inline void q_store_i8(int8_t *out, qvec v) {
    __m256i w = _mm256_cvtps_epi32(v);
    __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storel_epi64((__m128i *)out, _mm_packs_epi16(h, h));
}
#endif

static float row_peak(const float *restrict row, long n) { /* NaN if the row holds one */
    float peak = 0.0f;
    int nan = 0;
    long c = 0;
#if defined(QVL)
    qvec m = q_set1(0.0f);
    for (; c + QVL <= n; c += QVL) {
        qvec v = q_load(row + c);
        nan |= q_any_nan(v);
        m = q_max(m, q_abs(v));
    }
    peak = q_hmax(m);
#endif
    for (; c < n; c++) {
        nan |= row[c] != row[c];
        peak = fmaxf(peak, fabsf(row[c]));
    }
    return nan ? NAN : peak;
}

static void quantize_row(const float *restrict row, float step, int8_t *restrict out, long n) {
    long c = 0;
#if defined(QVL)
    qvec s = q_set1(step), lo = q_set1(-127.0f), hi = q_set1(127.0f);
    for (; c + QVL <= n; c += QVL) q_store_i8(out + c, q_min(q_max(q_round(q_div(q_load(row + c), s)), lo), hi));
#endif
    for (; c < n; c++) out[c] = (int8_t)fminf(fmaxf(rintf(row[c] / step), -127.0f), 127.0f);
}

/* Per row of float32 planes x [P, T, C] (rows contiguous, planes `plane_stride`
 * floats apart): peaks[p * T + t] = max |x[p, t, :]|, NaN if the row holds one
 * (the caller's finiteness check must see it, as it sees torch's amax). */
void kv_row_peaks(const float *x, long planes, long tokens, long channels, long plane_stride,
                  float *peaks) {
    for (long p = 0; p < planes; p++)
        for (long t = 0; t < tokens; t++)
            peaks[p * tokens + t] = row_peak(x + p * plane_stride + t * channels, channels);
}

/* symbols[p, t, c] = clamp(rint(x[p, t, c] / steps[p * T + t]), -127, 127) as int8, as
 * quantize._code_residuals does in torch (IEEE division, round half to even). Steps
 * are finite and x / step is within [-127, 127] up to rounding (step >= peak / 127). */
void kv_quantize_rows(const float *x, long planes, long tokens, long channels, long plane_stride,
                      const float *steps, int8_t *symbols) {
    for (long p = 0; p < planes; p++)
        for (long t = 0; t < tokens; t++)
            quantize_row(x + p * plane_stride + t * channels, steps[p * tokens + t],
                         symbols + (p * tokens + t) * channels, channels);
}
