/* Symbol packing of the level codecs (kvstore/codec/packing.py), in C.
 *
 * The same bytes as packing.py's numpy twin: symbols of one column group
 * [start, end) of row-major rows [R, C] int8, read row by row, are coded as
 * offset binary (s + half, half = 2^(width-1); code 0 = escape) and packed
 * 8 / width codes to a byte, lowest bits first; the last byte is padded with
 * the code of 0. Escaped symbols (|s| >= half) are listed in order. Width 8 is
 * the symbols themselves. Like numpy's, |s| is taken in int8, so -128 (never
 * written by the quantizer) is not an escape and its code is not masked.
 *
 * A group is worked through in chunks of CHUNK symbols of its row-major stream:
 * gathered into an L1 buffer (read in place when the group is whole rows),
 * coded by plain loops that gcc vectorises, and scanned for escapes 64 symbols
 * at a time through a bit mask, so the cost of escapes is per escape.
 *
 * Every function checks its sizes and never reads or writes outside the
 * buffers it is given: unpacking stops with ERR_ESCAPES when the escape codes
 * outnumber the values, packing when the values would overflow their room.
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define CHUNK 4096     /* symbols per chunk: a multiple of 4 (whole bytes at every width) */
#define COUNT_TILE 512 /* columns counted in one pass over the rows */
#define COUNT_RUN 255  /* rows a uint8 counter takes before it is flushed */

enum { ERR_ESCAPES = -1, ERR_ARGS = -2 };

static long group_bytes(long num_symbols, int width) { return (num_symbols * width + 7) / 8; }
static long min_long(long a, long b) { return a < b ? a : b; }
static int8_t abs8(int8_t s) { return (int8_t)(uint8_t)(s < 0 ? -s : s); } /* -128 stays -128 */

/* ------------------------------------------------------------ escape masks */

/* Bit i set where p[i] == value, for i < n (n <= 64). */
static uint64_t eq_mask(const uint8_t *p, long n, uint8_t value) {
    uint64_t mask = 0;
    long i = 0;
#if defined(__AVX2__)
    if (n == 64) {
        __m256i v = _mm256_set1_epi8((char)value);
        __m256i lo = _mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)p), v);
        __m256i hi = _mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(p + 32)), v);
        uint64_t hi_bits = (uint32_t)_mm256_movemask_epi8(hi);
        return (uint32_t)_mm256_movemask_epi8(lo) | hi_bits << 32;
    }
#endif
    for (; i < n; i++)
        mask |= (uint64_t)(p[i] == value) << i;
    return mask;
}

/* Appends the symbols whose code is 0 to out (room left: room); the count, or ERR_ESCAPES. */
static long collect_escapes(const uint8_t *codes, const int8_t *symbols, long n, int8_t *out,
                            long room) {
    long count = 0;
    for (long i = 0; i < n; i += 64) {
        for (uint64_t m = eq_mask(codes + i, min_long(64, n - i), 0); m; m &= m - 1) {
            if (count == room)
                return ERR_ESCAPES;
            out[count++] = symbols[i + __builtin_ctzll(m)];
        }
    }
    return count;
}

/* Overwrites the symbols decoded from code 0 (value -half) with escapes in order. */
static long apply_escapes(int8_t *symbols, long n, int half, const int8_t *escapes, long room) {
    long count = 0;
    for (long i = 0; i < n; i += 64) {
        uint64_t m = eq_mask((const uint8_t *)symbols + i, min_long(64, n - i), (uint8_t)-half);
        for (; m; m &= m - 1) {
            if (count == room)
                return ERR_ESCAPES;
            symbols[i + __builtin_ctzll(m)] = escapes[count++];
        }
    }
    return count;
}

/* ------------------------------------------------------- gather / scatter */

/* Symbols [first, first + n) of the group stream (rows of `width` at `stride`) into dst. */
static void gather(const int8_t *base, long stride, long width, long first, long n, int8_t *dst) {
    long row = first / width, col = first % width;
    for (; n > 0; row++, col = 0) {
        long take = min_long(width - col, n);
        memcpy(dst, base + row * stride + col, (size_t)take);
        dst += take;
        n -= take;
    }
}

static void scatter(const int8_t *src, long n, int8_t *base, long stride, long width, long first) {
    long row = first / width, col = first % width;
    for (; n > 0; row++, col = 0) {
        long take = min_long(width - col, n);
        memcpy(base + row * stride + col, src, (size_t)take);
        src += take;
        n -= take;
    }
}

/* ------------------------------------------------------------------ chunks */

/* n symbols -> group_bytes(n) bytes at width 2 or 4; escapes as collect_escapes. */
static long pack_chunk(const int8_t *symbols, long n, int width, uint8_t *out, int8_t *escapes,
                       long room) {
    uint8_t codes[CHUNK];
    const int half = 1 << (width - 1), per_byte = 8 / width;
    for (long i = 0; i < n; i++)
        codes[i] = abs8(symbols[i]) >= half ? 0 : (uint8_t)(symbols[i] + half);
    long padded = (n + per_byte - 1) / per_byte * per_byte;
    for (long i = n; i < padded; i++)
        codes[i] = (uint8_t)half;
    /* A byte is code0 | code1 << w | ..., each term cut to 8 bits as numpy's uint8 shifts. */
    if (width == 4) {
        for (long k = 0; k < padded / 2; k++) {
            uint16_t v;
            memcpy(&v, codes + 2 * k, 2);
            out[k] = (uint8_t)(v | ((v >> 4) & 0xF0));
        }
    } else {
        for (long k = 0; k < padded / 4; k++) {
            uint32_t v;
            memcpy(&v, codes + 4 * k, 4);
            out[k] = (uint8_t)(v | ((v >> 6) & 0xFC) | ((v >> 12) & 0xF0) | ((v >> 18) & 0xC0));
        }
    }
    return collect_escapes(codes, symbols, n, escapes, room);
}

/* group_bytes(n) bytes at width 2 or 4 -> n symbols; escapes as apply_escapes. */
static long unpack_chunk(const uint8_t *in, long n, int width, int8_t *symbols,
                         const int8_t *escapes, long room) {
    const int half = 1 << (width - 1), per_byte = 8 / width;
    const long whole = n / per_byte;
    if (width == 4) {
        for (long k = 0; k < whole; k++) {
            symbols[2 * k] = (int8_t)((in[k] & 15) - half);
            symbols[2 * k + 1] = (int8_t)((in[k] >> 4) - half);
        }
    } else {
        for (long k = 0; k < whole; k++)
            for (int j = 0; j < 4; j++)
                symbols[4 * k + j] = (int8_t)(((in[k] >> (2 * j)) & 3) - half);
    }
    for (long i = whole * per_byte; i < n; i++) /* the last byte's symbols before its padding */
        symbols[i] = (int8_t)(((in[whole] >> (width * (i % per_byte))) & (2 * half - 1)) - half);
    return apply_escapes(symbols, n, half, escapes, room);
}

/* -------------------------------------------------------------- public API */

/* Per column c of rows [R, C]: count2[c] symbols with |s| > 1, count4[c] with |s| > 7. */
long kv_count_escapes(const int8_t *rows, long num_rows, long num_cols, int64_t *count2,
                      int64_t *count4) {
    if (num_rows < 0 || num_cols < 0)
        return ERR_ARGS;
    memset(count2, 0, (size_t)num_cols * sizeof *count2);
    memset(count4, 0, (size_t)num_cols * sizeof *count4);
    for (long c0 = 0; c0 < num_cols; c0 += COUNT_TILE) {
        const long tile = min_long(COUNT_TILE, num_cols - c0);
        for (long r0 = 0; r0 < num_rows; r0 += COUNT_RUN) {
            uint8_t n2[COUNT_TILE] = {0}, n4[COUNT_TILE] = {0};
            for (long r = r0; r < min_long(r0 + COUNT_RUN, num_rows); r++) {
                const int8_t *p = rows + r * num_cols + c0;
                for (long c = 0; c < tile; c++) {
                    n2[c] += abs8(p[c]) > 1;
                    n4[c] += abs8(p[c]) > 7;
                }
            }
            for (long c = 0; c < tile; c++) {
                count2[c0 + c] += n2[c];
                count4[c0 + c] += n4[c];
            }
        }
    }
    return 0;
}

static int bad_group(long num_rows, long num_cols, long start, long end, int width, long size) {
    return num_rows < 0 || start < 0 || end < start || end > num_cols ||
           (width != 2 && width != 4 && width != 8) ||
           size != group_bytes(num_rows * (end - start), width);
}

/* Columns [start, end) of rows [R, C] at width into packed (packed_size bytes) and
 * escapes (room values); returns the escapes written, ERR_ESCAPES or ERR_ARGS. */
long kv_pack_group(const int8_t *rows, long num_rows, long num_cols, long start, long end,
                   int width, uint8_t *packed, long packed_size, int8_t *escapes, long room) {
    if (bad_group(num_rows, num_cols, start, end, width, packed_size) || room < 0)
        return ERR_ARGS;
    const long cols = end - start, total = num_rows * cols;
    const int8_t *base = rows + start;
    if (width == 8) {
        if (total > 0)
            gather(base, num_cols, cols, 0, total, (int8_t *)packed);
        return 0;
    }
    int8_t buffer[CHUNK];
    long count = 0;
    for (long first = 0; first < total; first += CHUNK) {
        const long n = min_long(CHUNK, total - first);
        const int8_t *symbols = base + first; /* in place when the group is whole rows */
        if (cols != num_cols) {
            gather(base, num_cols, cols, first, n, buffer);
            symbols = buffer;
        }
        long got = pack_chunk(symbols, n, width, packed + first * width / 8, escapes + count,
                              room - count);
        if (got < 0)
            return got;
        count += got;
    }
    return count;
}

/* Inverse of kv_pack_group into columns [start, end) of rows [R, C], taking escape
 * values in order from escapes (num_escapes of them); returns the number used,
 * ERR_ESCAPES when the escape codes outnumber them, or ERR_ARGS. */
long kv_unpack_group(const uint8_t *packed, long packed_size, const int8_t *escapes,
                     long num_escapes, int width, int8_t *rows, long num_rows, long num_cols,
                     long start, long end) {
    if (bad_group(num_rows, num_cols, start, end, width, packed_size) || num_escapes < 0)
        return ERR_ARGS;
    const long cols = end - start, total = num_rows * cols;
    int8_t *base = rows + start;
    if (width == 8) {
        if (total > 0)
            scatter((const int8_t *)packed, total, base, num_cols, cols, 0);
        return 0;
    }
    int8_t buffer[CHUNK];
    long used = 0;
    for (long first = 0; first < total; first += CHUNK) {
        const long n = min_long(CHUNK, total - first);
        int8_t *symbols = cols == num_cols ? base + first : buffer;
        long got = unpack_chunk(packed + first * width / 8, n, width, symbols, escapes + used,
                                num_escapes - used);
        if (got < 0)
            return got;
        used += got;
        if (cols != num_cols)
            scatter(buffer, n, base, num_cols, cols, first);
    }
    return used;
}
