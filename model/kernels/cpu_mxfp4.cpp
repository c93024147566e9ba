// The fused MXFP4 matmul of the CPU experts. Built by model/kernels/cpu_mxfp4.py, which fills in the e2m1 table,
// the scale bias and the token tile from its Python definitions before compiling.
//
// Two paths, chosen per call by the activations' dtype:
// * bfloat16 activations on a CPU with AVX512-BF16: weights decoded to bfloat16 (exact: an e2m1 value times a
//   power of two is a bfloat16) and multiplied by VDPBF16PS, two products per float32 lane, float32 sums.
// * float32 activations (or no AVX512-BF16): weights decoded to float32, FMAs into float32 sums.
// Both decode a nibble by a table lookup in one register (a 16-entry table, one permute per 16 or 32 codes) and
// scale each block of 32 once, by its power of two; both are exact to float32's rounding of the sums.
// Beside them, bf16_gemv: a few bfloat16 rows times a plain row-major bfloat16 matrix (no MXFP4), at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static float FP4[16] = {FP4_VALUES};
static float POW2[256];
// FP4 times 2^(s - 127) as bfloat16 bits (the top half of each float32: exact, an e2m1 value has one mantissa
// bit), 16 values twice per scale s: the 32-word table one permute looks a block's codes up in.
alignas(64) static uint16_t FP4_BF16[256][32];
static bool TABLES_READY = [] {
    for (int s = 0; s < 256; ++s) {
        POW2[s] = (float)std::ldexp(1.0, s - SCALE_BIAS);
        for (int i = 0; i < 32; ++i) {
            const float v = FP4[i % 16] * POW2[s];
            uint32_t bits;
            std::memcpy(&bits, &v, 4);
            FP4_BF16[s][i] = (uint16_t)(bits >> 16);
        }
    }
    return true;
}();

// ---------------------------------------------------------------------------------------------------------
// float32 activations. Rows [r0, r1) of out[m0:m0+MT] = x[m0:m0+MT] . W^T (+ bias). xp [G, M, 32] holds the
// inputs block by block, all tokens' 32 values of a block together, each as its 16 even elements then its 16
// odd ones, so the decoded low and high nibbles meet contiguous inputs.
template <int MT>
static void tile_f32(const float* xp, const uint8_t* blocks, const uint8_t* scales, const float* bias, float* out,
                     int64_t G, int64_t N, int64_t M, int64_t m0, int64_t r0, int64_t r1) {
#if defined(__AVX512F__)
    const __m512 lut = _mm512_loadu_ps(FP4);
    const __m512i low4 = _mm512_set1_epi32(0xF);
    // U blocks in flight with their own accumulators, and separate ones for the even and odd halves, so
    // that few tokens still give the FMA unit independent chains (one chain waits out the FMA's latency).
    constexpr int U = MT <= 2 ? 2 : 1;
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* b = blocks + r * G * 16;
        const uint8_t* s = scales + r * G;
        __m512 acc[U][2][MT];
        for (int u = 0; u < U; ++u)
            for (int m = 0; m < MT; ++m) acc[u][0][m] = acc[u][1][m] = _mm512_setzero_ps();
        int64_t g = 0;
        for (; g + U <= G; g += U) {
            for (int u = 0; u < U; ++u) {
                const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b + (g + u) * 16)));
                const __m512 scale = _mm512_set1_ps(POW2[s[g + u]]);
                const __m512 even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(codes, low4), lut), scale);
                const __m512 odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), lut), scale);
                for (int m = 0; m < MT; ++m) {
                    const float* x = xp + ((g + u) * M + m0 + m) * 32;
                    acc[u][0][m] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x), acc[u][0][m]);
                    acc[u][1][m] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + 16), acc[u][1][m]);
                }
            }
        }
        for (; g < G; ++g) {  // the blocks left over from the unrolled loop
            const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b + g * 16)));
            const __m512 scale = _mm512_set1_ps(POW2[s[g]]);
            const __m512 even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(codes, low4), lut), scale);
            const __m512 odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), lut), scale);
            for (int m = 0; m < MT; ++m) {
                const float* x = xp + (g * M + m0 + m) * 32;
                acc[0][0][m] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x), acc[0][0][m]);
                acc[0][1][m] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + 16), acc[0][1][m]);
            }
        }
        for (int m = 0; m < MT; ++m) {
            __m512 sum = _mm512_add_ps(acc[0][0][m], acc[0][1][m]);
            for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, _mm512_add_ps(acc[u][0][m], acc[u][1][m]));
            out[(m0 + m) * N + r] = _mm512_reduce_add_ps(sum) + (bias ? bias[r] : 0.f);
        }
    }
#elif defined(__AVX2__) && defined(__FMA__)
    // Eight lanes: the table holds the eight magnitudes and the code's top bit is the sign, put in place by a
    // shift and an xor.
    const __m256 lut = _mm256_loadu_ps(FP4);
    const __m256i low3 = _mm256_set1_epi32(0x7), sign = _mm256_set1_epi32(0x8);
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* b = blocks + r * G * 16;
        const uint8_t* s = scales + r * G;
        __m256 acc[4][MT];
        for (int q = 0; q < 4; ++q)
            for (int m = 0; m < MT; ++m) acc[q][m] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
            const __m256 scale = _mm256_set1_ps(POW2[s[g]]);
            for (int h = 0; h < 2; ++h) {  // bytes 0-7, then 8-15
                const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(b + g * 16 + h * 8)));
                const __m256i lo = codes, hi = _mm256_srli_epi32(codes, 4);
                const __m256 even = _mm256_mul_ps(
                    _mm256_xor_ps(_mm256_permutevar8x32_ps(lut, _mm256_and_si256(lo, low3)),
                                  _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(lo, sign), 28))),
                    scale);
                const __m256 odd = _mm256_mul_ps(
                    _mm256_xor_ps(_mm256_permutevar8x32_ps(lut, _mm256_and_si256(hi, low3)),
                                  _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(hi, sign), 28))),
                    scale);
                for (int m = 0; m < MT; ++m) {
                    const float* x = xp + (g * M + m0 + m) * 32 + h * 8;
                    acc[2 * h][m] = _mm256_fmadd_ps(even, _mm256_loadu_ps(x), acc[2 * h][m]);
                    acc[2 * h + 1][m] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x + 16), acc[2 * h + 1][m]);
                }
            }
        }
        for (int m = 0; m < MT; ++m) {
            const __m256 sum8 = _mm256_add_ps(_mm256_add_ps(acc[0][m], acc[1][m]), _mm256_add_ps(acc[2][m], acc[3][m]));
            __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
            sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
            sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
            out[(m0 + m) * N + r] = _mm_cvtss_f32(sum4) + (bias ? bias[r] : 0.f);
        }
    }
#else
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* b = blocks + r * G * 16;
        const uint8_t* s = scales + r * G;
        float acc[MT] = {};
        for (int64_t g = 0; g < G; ++g) {
            const float scale = POW2[s[g]];
            for (int j = 0; j < 16; ++j) {
                const float even = FP4[b[g * 16 + j] & 0xF] * scale, odd = FP4[b[g * 16 + j] >> 4] * scale;
                for (int m = 0; m < MT; ++m) {
                    const float* x = xp + (g * M + m0 + m) * 32;
                    acc[m] += even * x[j] + odd * x[16 + j];
                }
            }
        }
        for (int m = 0; m < MT; ++m) out[(m0 + m) * N + r] = acc[m] + (bias ? bias[r] : 0.f);
    }
#endif
}

using TileFn = void (*)(const float*, const uint8_t*, const uint8_t*, const float*, float*, int64_t, int64_t,
                        int64_t, int64_t, int64_t, int64_t);
static const TileFn TILES_F32[TILE_MAX] = {tile_f32<1>, tile_f32<2>, tile_f32<3>, tile_f32<4>,
                                           tile_f32<5>, tile_f32<6>, tile_f32<7>, tile_f32<8>};

static torch::Tensor linear_f32(const torch::Tensor& x, const uint8_t* bptr, const uint8_t* sptr,
                                const float* biasptr, int64_t N, int64_t G) {
    const int64_t M = x.size(0);
    auto xp = x.reshape({M, G, 16, 2}).permute({1, 0, 3, 2}).contiguous();
    auto out = torch::empty({M, N}, x.options());
    const float* xptr = xp.data_ptr<float>();
    float* optr = out.data_ptr<float>();
    // About 64 KB of packed weights per task, reused by every token tile while it sits in the cache.
    const int64_t grain = std::max<int64_t>(1, 65536 / (G * 17));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r0 = begin; r0 < end; r0 += grain) {
            const int64_t r1 = std::min(end, r0 + grain);
            for (int64_t m0 = 0; m0 < M; m0 += TILE_MAX) {
                const int64_t mt = std::min<int64_t>(TILE_MAX, M - m0);
                TILES_F32[mt - 1](xptr, bptr, sptr, biasptr, optr, G, N, M, m0, r0, r1);
            }
        }
    });
    return out;
}

// ---------------------------------------------------------------------------------------------------------
// bfloat16 activations.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr bool HAS_BF16 = true;

// Scales for which every scaled weight is a normal bfloat16 and its product with any activation of magnitude
// at least 2^-62 is a normal float32: VDPBF16PS (like oneDNN's bfloat16 matmuls) flushes subnormal inputs and
// products to zero, so rows with a scale outside take the float32 loop below instead. Trained checkpoints'
// scales sit near 127, far inside. (An activation itself below float32's normal range still counts as zero.)
constexpr int SAFE_LO = 64, SAFE_HI = 252;
constexpr int ROWS = 4;   // weight rows decoded together and multiplied against the same token tile
constexpr int TOKENS = 6; // tokens per tile: ROWS x TOKENS accumulators, ROWS weights and one input in registers

// One block's 32 weights as bfloat16, in the elements' own order: the 16 bytes widened to 16 dwords give 32
// words each holding one nibble (low nibble first), which index the block's scaled table (one permute).
static inline __m512i decode_block(const uint8_t* b, uint8_t s) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)b));
    // 0xF8 = A | (B & C): the low nibble in the low word, the high nibble (shifted) in the high word.
    const __m512i idx = _mm512_ternarylogic_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF)),
                                                  _mm512_slli_epi32(bytes, 12), _mm512_set1_epi32(0xF0000), 0xF8);
    return _mm512_permutexvar_epi16(idx, _mm512_load_si512(FP4_BF16[s]));
}

// Rows [r0, r0 + ROWS) of the packed weights decoded into w [ROWS, G, 32]; rows past r1 (the last group) are
// zeros.
static void decode_rows(const uint8_t* blocks, const uint8_t* scales, int64_t G, int64_t r0, int64_t r1,
                        uint16_t* w) {
    for (int i = 0; i < ROWS; ++i) {
        uint16_t* wr = w + i * G * 32;
        if (r0 + i >= r1) {
            std::memset(wr, 0, G * 32 * sizeof(uint16_t));
            continue;
        }
        const uint8_t* b = blocks + (r0 + i) * G * 16;
        const uint8_t* s = scales + (r0 + i) * G;
        for (int64_t g = 0; g < G; ++g) _mm512_storeu_si512(wr + g * 32, decode_block(b + g * 16, s[g]));
    }
}

// out[m0:m0+MT, r0:r0+ROWS] (clipped to r1) and bfloat16 inputs x [M, K], the weights read from w (decoded by
// decode_rows, for tiles that share them) or, without DECODED, decoded in registers from the packed rows
// (a decode step's few tokens: nothing to share, so no round trip through memory).
template <int MT, bool DECODED>
static void dot_tile(const uint16_t* w, const uint8_t* blocks, const uint8_t* scales, const uint16_t* x,
                     const float* bias, float* out, int64_t G, int64_t N, int64_t m0, int64_t r0, int64_t r1) {
    const int64_t K = G * 32;
    const uint8_t* b[ROWS];
    const uint8_t* s[ROWS];
    for (int i = 0; i < ROWS; ++i) {  // past the last row: read the last row again, its results dropped
        const int64_t r = std::min(r0 + i, r1 - 1);
        b[i] = blocks + r * G * 16;
        s[i] = scales + r * G;
    }
    __m512 acc[ROWS][MT];
    for (int i = 0; i < ROWS; ++i)
        for (int m = 0; m < MT; ++m) acc[i][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m512bh wv[ROWS];
        for (int i = 0; i < ROWS; ++i)
            wv[i] = (__m512bh)(DECODED ? _mm512_loadu_si512(w + (i * G + g) * 32)
                                       : decode_block(b[i] + g * 16, s[i][g]));
        for (int m = 0; m < MT; ++m) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + m) * K + g * 32);
            for (int i = 0; i < ROWS; ++i) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], wv[i], xv);
        }
    }
    for (int i = 0; i < ROWS && r0 + i < r1; ++i)
        for (int m = 0; m < MT; ++m)
            out[(m0 + m) * N + r0 + i] = _mm512_reduce_add_ps(acc[i][m]) + (bias ? bias[r0 + i] : 0.f);
}

using DotFn = void (*)(const uint16_t*, const uint8_t*, const uint8_t*, const uint16_t*, const float*, float*, int64_t,
                      int64_t, int64_t, int64_t, int64_t);
constexpr int DIRECT_MAX = 3;  // up to this many tokens, decode in registers (no decoded rows in memory)
static const DotFn DOTS[TOKENS] = {dot_tile<1, true>, dot_tile<2, true>, dot_tile<3, true>,
                                   dot_tile<4, true>, dot_tile<5, true>, dot_tile<6, true>};
static const DotFn DIRECT[DIRECT_MAX] = {dot_tile<1, false>, dot_tile<2, false>, dot_tile<3, false>};

// A single token (batch-1 decode), four blocks per step, in three parts:
// * Decoding without widening. The four blocks' 64 bytes are loaded as 32 words, each holding four codes (two
//   bytes, low nibble first). VPERMW reads only an index's low five bits, so with the 16 unscaled e2m1 values
//   twice in its table, the words as they are look up each word's first code, and shifted by 4, 8 and 12 its
//   second, third and fourth: four permutes for 128 weights, against a widening and two permutes per 64 before.
//   The input is laid out once per call in the same order (quad_inputs): per four blocks, the elements 4j, then
//   4j + 1, 4j + 2 and 4j + 3 of the 128.
// * Scales after the sums. Word j of the load belongs to block j / 8, so each float32 lane of VDPBF16PS's sums
//   holds one block's products: four lanes per block. The products are summed unscaled (exact: an e2m1 value
//   times a bfloat16 fits float32's mantissa), then multiplied by the blocks' powers of two in one FMA, a
//   vector of sixteen built from sixteen scale bytes at once (each byte shifted into a float32's exponent). The
//   per-block tables of the scaled values, two 64-byte loads per two blocks, are gone: loads, not arithmetic,
//   had set the pace (five 64-byte loads per two blocks; now two and a half).
// * Rows in order. The rows are taken one after another, each read front to back: with several rows read side
//   by side (eight interleaved streams of 1,440 bytes at gpt-oss widths) one thread read its bytes at about 13
//   GB/s even with no arithmetic, against about 30 GB/s for the same bytes in order (benchmarks/README.md).
// One thread multiplied 600 rows of 90 blocks held in L2 about 1.25x faster than the two-block loop it replaces,
// and two threads multiplied rows read from memory about 1.3x faster (benchmarks/README.md). The results are the same
// products summed in float32 in another order. The last G % 4 blocks take decode_block, in natural order.
constexpr int ROWS_ONE = 8;  // rows per parallel task, whose scales are checked together

// Lanes of the sixteen scales' vector (blocks g .. g + 15) for the four blocks from g + 4q on: four each.
alignas(64) static int32_t QUAD_SCALE_LANES[4][16];
static bool QUAD_SCALE_LANES_READY = [] {
    for (int q = 0; q < 4; ++q)
        for (int i = 0; i < 16; ++i) QUAD_SCALE_LANES[q][i] = 4 * q + i / 4;
    return true;
}();

// x [K] into xq [K]: per four blocks (128 elements c), the elements c + 4j, then c + 4j + 1, c + 4j + 2 and
// c + 4j + 3 (j = 0 .. 31); the last G % 4 blocks as they are.
static void quad_inputs(const uint16_t* x, uint16_t* xq, int64_t G) {
    int64_t g = 0;
    for (; g + 4 <= G; g += 4)
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 32; ++j) xq[g * 32 + i * 32 + j] = x[g * 32 + 4 * j + i];
    if (g < G) std::memcpy(xq + g * 32, x + g * 32, (G - g) * 32 * sizeof(uint16_t));
}

// The unscaled products of four blocks' 64 bytes b with their inputs xq (quad_inputs' order), summed per
// float32 lane: lanes 4i .. 4i + 3 hold block i's.
static inline __m512 quad_sums(const uint8_t* b, const uint16_t* xq, __m512i table) {
    const __m512i w = _mm512_loadu_si512(b);
    __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_permutexvar_epi16(w, table),
                                (__m512bh)_mm512_loadu_si512(xq));
    __m512 u = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table),
                                (__m512bh)_mm512_loadu_si512(xq + 32));
    t = _mm512_dpbf16_ps(t, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), table),
                         (__m512bh)_mm512_loadu_si512(xq + 64));
    u = _mm512_dpbf16_ps(u, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), table),
                         (__m512bh)_mm512_loadu_si512(xq + 96));
    return _mm512_add_ps(t, u);
}

// 2^(s - 127) for n (up to 16) scale bytes as float32s: each byte shifted into the exponent. Exact for the
// scales the safe range admits.
static inline __m512 scale_powers(const uint8_t* s, int n) {
    const __m128i bytes = _mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), s);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu8_epi32(bytes), 23));
}

static void dot_one(const uint8_t* blocks, const uint8_t* scales, const uint16_t* xq, const float* bias, float* out,
                    int64_t G, int64_t r0, int64_t r1) {
    static_assert(SCALE_BIAS == 127, "scale_powers builds 2^(s - 127)");
    const __m512i table = _mm512_load_si512(FP4_BF16[SCALE_BIAS]);  // the unscaled values, twice
    __m512i lanes[4];
    for (int q = 0; q < 4; ++q) lanes[q] = _mm512_load_si512(QUAD_SCALE_LANES[q]);
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* b = blocks + r * G * 16;
        const uint8_t* s = scales + r * G;
        __m512 acc[4];
        for (int q = 0; q < 4; ++q) acc[q] = _mm512_setzero_ps();
        int64_t g = 0;
        for (; g + 16 <= G; g += 16) {
            const __m512 pow2 = scale_powers(s + g, 16);
            for (int q = 0; q < 4; ++q)
                acc[q] = _mm512_fmadd_ps(quad_sums(b + (g + 4 * q) * 16, xq + (g + 4 * q) * 32, table),
                                         _mm512_permutexvar_ps(lanes[q], pow2), acc[q]);
        }
        for (; g + 4 <= G; g += 4)
            acc[0] = _mm512_fmadd_ps(quad_sums(b + g * 16, xq + g * 32, table),
                                     _mm512_permutexvar_ps(lanes[0], scale_powers(s + g, 4)), acc[0]);
        for (; g < G; ++g)
            acc[1] = _mm512_dpbf16_ps(acc[1], (__m512bh)decode_block(b + g * 16, s[g]),
                                      (__m512bh)_mm512_loadu_si512(xq + g * 32));
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        out[r] = _mm512_reduce_add_ps(sum) + (bias ? bias[r] : 0.f);
    }
}

// Row pairs: the layout a model gives its packed experts on CPUs with this path (model.kernels.mxfp4.pair_rows
// is its twin). Rows 2p and 2p + 1 lie together in 2 x G x 16 bytes: for each segment of 16 blocks, row 2p's 256
// bytes, then row 2p + 1's, each interleaved so that its 64-byte chunk c holds bytes 4c .. 4c + 3 of each of
// the 16 blocks (block i at byte 4i); after the last whole segment, the G % 16 blocks left of row 2p, then of
// row 2p + 1, as they are. What each part buys over dot_one's four blocks side by side:
// * One scale multiply per segment. Float32 lane i of VDPBF16PS's sums over any chunk of a segment holds block
//   i's products only, so a row's 16 sums of a segment add up unscaled and meet the 16 blocks' powers of two,
//   in order, in one FMA, where four blocks side by side took a lane permute and an FMA per 64 bytes.
// * One input load for both rows (for every token, up to PAIRED_MAX). The two rows of a pair take the same
//   inputs at the same offsets and lie next to each other, so each input vector feeds both while the bytes are
//   still read in address order, as one stream (two rows read from two places ran at a third of the speed, in
//   scratch C). dot_one loads four 64-byte vectors of inputs for each 64 bytes of weights; with the inputs held
//   in registers instead (a timing only, the same scratch) the loop took two thirds of its time.
// * Two shifts per chunk. A word's third and fourth codes are its second byte's nibbles: the chunk loaded
//   again one byte further on holds them in the low bits (masked, so it never reads past the chunk).
// The inputs are laid out once per call in the same order (paired_inputs); the products are the same, summed in
// float32 in another order. Where rows are wanted in their own order (more tokens, a row with unsafe scales),
// unpair_rows restores it, a group of rows at a time. Timings in benchmarks/README.md.
constexpr int SEGMENT = 16;  // blocks per interleaved segment

// x [K] into xi [K]: per segment of 16 blocks (512 elements from c0), for chunk c and code k of each word, the
// elements c0 + 32 (j / 2) + 8c + 4 (j % 2) + k (j = 0 .. 31); the blocks after the last segment in quad_inputs'
// order.
static void paired_inputs(const uint16_t* x, uint16_t* xi, int64_t G) {
    const int64_t S = G / SEGMENT * SEGMENT;
    for (int64_t g = 0; g < S; g += SEGMENT)
        for (int c = 0; c < 4; ++c)
            for (int k = 0; k < 4; ++k)
                for (int j = 0; j < 32; ++j)
                    xi[g * 32 + c * 128 + k * 32 + j] = x[(g + j / 2) * 32 + 8 * c + 4 * (j % 2) + k];
    quad_inputs(x + S * 32, xi + S * 32, G - S);
}

// Dword j = 4b + c of the 64 natural bytes of blocks 4o .. 4o + 3 is dword 4o + b of chunk c: its index into a
// pair of chunks (c & 1 picks the second), for each o.
alignas(64) static int32_t UNPAIR_INDEX[4][16];
static bool UNPAIR_INDEX_READY = [] {
    for (int o = 0; o < 4; ++o)
        for (int j = 0; j < 16; ++j) UNPAIR_INDEX[o][j] = (j % 4 & 1) * 16 + 4 * o + j / 4;
    return true;
}();

// `rows` (even) rows in the paired layout at `pairs` into natural rows (rows x G x 16 bytes) at `out`.
static void unpair_rows(const uint8_t* pairs, int64_t rows, int64_t G, uint8_t* out) {
    const int64_t S = G / SEGMENT * SEGMENT, T = G - S;
    const __mmask16 upper = 0xCCCC;  // dwords from chunks 2 and 3
    for (int64_t r = 0; r < rows; r += 2) {
        const uint8_t* pair = pairs + r * G * 16;
        for (int h = 0; h < 2; ++h) {
            uint8_t* row = out + (r + h) * G * 16;
            for (int64_t g = 0; g < S; g += SEGMENT) {
                const uint8_t* seg = pair + g * 32 + h * SEGMENT * 16;
                __m512i chunk[4];
                for (int c = 0; c < 4; ++c) chunk[c] = _mm512_loadu_si512(seg + c * 64);
                for (int o = 0; o < 4; ++o) {
                    const __m512i index = _mm512_load_si512(UNPAIR_INDEX[o]);
                    const __m512i low = _mm512_permutex2var_epi32(chunk[0], index, chunk[1]);
                    const __m512i high = _mm512_permutex2var_epi32(chunk[2], index, chunk[3]);
                    _mm512_storeu_si512(row + (g + 4 * o) * 16, _mm512_mask_blend_epi32(upper, low, high));
                }
            }
            std::memcpy(row + S * 16, pair + S * 32 + h * T * 16, T * 16);
        }
    }
}

// Rows [r0, r1) (r0 even, r1 even) of out[MT, N] = x . W^T (+ bias) on paired rows, for MT (1 .. PAIRED_MAX)
// input rows xi [MT, K] in paired_inputs' order: both rows of a pair decoded once per chunk, for every token.
template <int MT>
static void dot_paired(const uint8_t* blocks, const uint8_t* scales, const uint16_t* xi, const float* bias,
                       float* out, int64_t G, int64_t N, int64_t r0, int64_t r1) {
    static_assert(SCALE_BIAS == 127, "scale_powers builds 2^(s - 127)");
    constexpr int C = MT == 1 ? 2 : 1;  // chains of sums per row and token: one alone would wait on VDPBF16PS
    const __m512i table = _mm512_load_si512(FP4_BF16[SCALE_BIAS]);  // the unscaled values, twice
    const __m512i lanes = _mm512_load_si512(QUAD_SCALE_LANES[0]);
    const __mmask64 chunk_only = ~0ull >> 1;  // the load one byte on stops at the chunk's last byte
    const int64_t K = G * 32, S = G / SEGMENT * SEGMENT, T = G - S;
    for (int64_t r = r0; r < r1; r += 2) {
        const uint8_t* pair = blocks + r * G * 16;
        const uint8_t* s[2] = {scales + r * G, scales + (r + 1) * G};
        __m512 acc[2][MT];
        for (int h = 0; h < 2; ++h)
            for (int m = 0; m < MT; ++m) acc[h][m] = _mm512_setzero_ps();
        for (int64_t g = 0; g < S; g += SEGMENT) {
            __m512 t[2][MT][C];
            for (int h = 0; h < 2; ++h)
                for (int m = 0; m < MT; ++m)
                    for (int i = 0; i < C; ++i) t[h][m][i] = _mm512_setzero_ps();
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) {
                __m512bh codes[2][4];  // both rows' chunk c, one vector per code of each word
#pragma GCC unroll 2
                for (int h = 0; h < 2; ++h) {
                    const uint8_t* p = pair + g * 32 + h * SEGMENT * 16 + c * 64;
                    const __m512i w = _mm512_loadu_si512(p);
                    const __m512i next = _mm512_maskz_loadu_epi8(chunk_only, p + 1);
                    codes[h][0] = (__m512bh)_mm512_permutexvar_epi16(w, table);
                    codes[h][1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
                    codes[h][2] = (__m512bh)_mm512_permutexvar_epi16(next, table);
                    codes[h][3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(next, 4), table);
                }
                for (int m = 0; m < MT; ++m) {
                    const uint16_t* x = xi + m * K + g * 32 + c * 128;
                    for (int k = 0; k < 4; ++k) {
                        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + 32 * k);
                        for (int h = 0; h < 2; ++h)
                            t[h][m][k % C] = _mm512_dpbf16_ps(t[h][m][k % C], codes[h][k], xv);
                    }
                }
            }
            for (int h = 0; h < 2; ++h) {
                const __m512 pow2 = scale_powers(s[h] + g, SEGMENT);
                for (int m = 0; m < MT; ++m) {
                    __m512 sum = t[h][m][0];
                    for (int i = 1; i < C; ++i) sum = _mm512_add_ps(sum, t[h][m][i]);
                    acc[h][m] = _mm512_fmadd_ps(sum, pow2, acc[h][m]);
                }
            }
        }
        for (int h = 0; h < 2; ++h) {
            const uint8_t* b = pair + S * 32 + h * T * 16;
            const uint8_t* st = s[h] + S;
            for (int m = 0; m < MT; ++m) {
                const uint16_t* xt = xi + m * K + S * 32;
                __m512 sum = acc[h][m], left = _mm512_setzero_ps();
                int64_t g = 0;
                for (; g + 4 <= T; g += 4)
                    sum = _mm512_fmadd_ps(quad_sums(b + g * 16, xt + g * 32, table),
                                          _mm512_permutexvar_ps(lanes, scale_powers(st + g, 4)), sum);
                for (; g < T; ++g)
                    left = _mm512_dpbf16_ps(left, (__m512bh)decode_block(b + g * 16, st[g]),
                                            (__m512bh)_mm512_loadu_si512(xt + g * 32));
                out[m * N + r + h] =
                    _mm512_reduce_add_ps(_mm512_add_ps(sum, left)) + (bias ? bias[r + h] : 0.f);
            }
        }
    }
}

using PairedFn = void (*)(const uint8_t*, const uint8_t*, const uint16_t*, const float*, float*, int64_t, int64_t,
                          int64_t, int64_t);
constexpr int PAIRED_MAX = 4;  // up to this many tokens, paired rows are multiplied as they lie
static const PairedFn DOTS_PAIRED[PAIRED_MAX] = {dot_paired<1>, dot_paired<2>, dot_paired<3>, dot_paired<4>};

// Whether all n scales lie in [SAFE_LO, SAFE_HI], 64 at a time: it runs before every group of rows.
static bool scales_safe(const uint8_t* s, int64_t n) {
    __m512i lo = _mm512_set1_epi8((char)0xFF), hi = _mm512_setzero_si512();
    for (int64_t i = 0; i < n; i += 64) {
        const __mmask64 mask = n - i >= 64 ? ~0ull : (1ull << (n - i)) - 1;
        const __m512i v = _mm512_maskz_loadu_epi8(mask, s + i);
        lo = _mm512_min_epu8(lo, _mm512_mask_blend_epi8(mask, _mm512_set1_epi8((char)SAFE_LO), v));
        hi = _mm512_max_epu8(hi, v);
    }
    return !_mm512_cmplt_epu8_mask(lo, _mm512_set1_epi8((char)SAFE_LO)) &&
           !_mm512_cmpgt_epu8_mask(hi, _mm512_set1_epi8((char)SAFE_HI));
}

static float bf16_to_float(uint16_t v) {
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// A row with a scale outside [SAFE_LO, SAFE_HI]: plain float32, as the reference computes it.
static void row_exact(const uint8_t* b, const uint8_t* s, const uint16_t* x, const float* bias, float* out,
                      int64_t G, int64_t N, int64_t M, int64_t r) {
    for (int64_t m = 0; m < M; ++m) {
        const uint16_t* xm = x + m * G * 32;
        float acc = 0.f;
        for (int64_t g = 0; g < G; ++g)
            for (int j = 0; j < 16; ++j) {
                const uint8_t byte = b[g * 16 + j];
                acc = std::fma(FP4[byte & 0xF] * POW2[s[g]], bf16_to_float(xm[g * 32 + 2 * j]), acc);
                acc = std::fma(FP4[byte >> 4] * POW2[s[g]], bf16_to_float(xm[g * 32 + 2 * j + 1]), acc);
            }
        out[m * N + r] = acc + (bias ? bias[r] : 0.f);
    }
}

// Rows [r0, r0 + ROWS_ONE) (clipped to N) of the product with M input rows x [M, K]: one (dot_one) on rows in
// their own order, up to PAIRED_MAX (dot_paired) on `paired` rows; xq is x in quad_inputs' or paired_inputs'
// order. Rows whose scales are out of the safe range take the float32 loop, on their natural bytes.
static void few_token_rows(const uint8_t* bptr, const uint8_t* sptr, const uint16_t* xq, const uint16_t* x,
                           int64_t M, const float* bias, float* out, int64_t G, int64_t N, int64_t r0, bool paired) {
    static_assert(ROWS_ONE % 2 == 0, "a group of rows holds whole pairs");
    const int64_t r1 = std::min(N, r0 + ROWS_ONE);
    if (scales_safe(sptr + r0 * G, (r1 - r0) * G)) {
        if (paired)
            DOTS_PAIRED[M - 1](bptr, sptr, xq, bias, out, G, N, r0, r1);
        else
            dot_one(bptr, sptr, xq, bias, out, G, r0, r1);
        return;
    }
    std::vector<uint8_t> natural(paired ? (r1 - r0) * G * 16 : 0);
    if (paired) unpair_rows(bptr + r0 * G * 16, r1 - r0, G, natural.data());
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = paired ? natural.data() + (r - r0) * G * 16 : bptr + r * G * 16;
        row_exact(row, sptr + r * G, x, bias, out, G, N, M, r);
    }
}

static torch::Tensor linear_bf16(const torch::Tensor& x, const uint8_t* bptr, const uint8_t* sptr,
                                 const float* biasptr, int64_t N, int64_t G, bool paired) {
    const int64_t M = x.size(0);
    auto out = torch::empty({M, N}, x.options().dtype(at::kFloat));
    const uint16_t* xptr = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    float* optr = out.data_ptr<float>();
    if (M == 1 || (paired && M <= PAIRED_MAX)) {
        const int64_t K = G * 32;
        std::vector<uint16_t> xq(M * K);
        for (int64_t m = 0; m < M; ++m) (paired ? paired_inputs : quad_inputs)(xptr + m * K, xq.data() + m * K, G);
        at::parallel_for(0, (N + ROWS_ONE - 1) / ROWS_ONE, 1, [&](int64_t begin, int64_t end) {
            for (int64_t grp = begin; grp < end; ++grp)
                few_token_rows(bptr, sptr, xq.data(), xptr, M, biasptr, optr, G, N, grp * ROWS_ONE, paired);
        });
        return out;
    }
    static_assert(ROWS % 2 == 0, "a group of rows holds whole pairs");
    const int64_t groups = (N + ROWS - 1) / ROWS;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
        // One group's decoded rows (23 KB at gpt-oss widths) stay in L1 while every token tile reads them.
        std::vector<uint16_t> w(M > DIRECT_MAX ? ROWS * G * 32 : 0);
        std::vector<uint8_t> natural(paired ? ROWS * G * 16 : 0);  // paired rows put back in their own order
        for (int64_t grp = begin; grp < end; ++grp) {
            const int64_t r0 = grp * ROWS, r1 = std::min(N, r0 + ROWS);
            // The group's rows, scales, biases and outputs, its first row at index 0.
            const uint8_t* b = bptr + r0 * G * 16;
            if (paired) {
                unpair_rows(b, r1 - r0, G, natural.data());
                b = natural.data();
            }
            const uint8_t* s = sptr + r0 * G;
            const float* bias = biasptr ? biasptr + r0 : nullptr;
            float* o = optr + r0;
            const int64_t n = r1 - r0;
            if (!scales_safe(s, n * G)) {
                for (int64_t r = 0; r < n; ++r) row_exact(b + r * G * 16, s + r * G, xptr, bias, o, G, N, M, r);
                continue;
            }
            if (M <= DIRECT_MAX) {
                DIRECT[M - 1](nullptr, b, s, xptr, bias, o, G, N, 0, 0, n);
                continue;
            }
            decode_rows(b, s, G, 0, n, w.data());
            for (int64_t m0 = 0; m0 < M; m0 += TOKENS) {
                const int64_t mt = std::min<int64_t>(TOKENS, M - m0);
                DOTS[mt - 1](w.data(), b, s, xptr, bias, o, G, N, m0, 0, n);
            }
        }
    });
    return out;
}
#else
constexpr bool HAS_BF16 = false;

static torch::Tensor linear_bf16(const torch::Tensor&, const uint8_t*, const uint8_t*, const float*, int64_t,
                                 int64_t, bool) {
    TORCH_CHECK(false, "this build has no bfloat16 path: pass float32 inputs");
}
#endif

// ---------------------------------------------------------------------------------------------------------
// The decode GEMV on a plain row-major bfloat16 weight: out[m, r] = x[m] . w[r] (+ bias[r]) for a few rows of x,
// bound by reading the weight once. Each thread takes a contiguous range of weight rows.
//
// For one or two input rows (decode at batch 1 and 2) the rows are read one after another, each front to back:
// one stream in address order, which the hardware prefetchers follow as they follow a plain read loop. Rows read
// side by side are as many short streams (5,760 bytes each at K = 2880), which they follow poorly: with the
// memory at its fastest, sixteen rows side by side read the unembedding at about 0.75x the speed of a read loop
// over the same bytes and two at about 0.55x, one at a time at about 0.9x (benchmarks/README.md). Each
// 32-element load of the row feeds VDPBF16PS against each input row's, into GEMV_CHAINS independent float32
// sums per input row (enough to hide its latency; four were slower).
//
// From three input rows on, the products rather than the loads set the pace, and the weight rows advance in
// groups of 16 (92 KB: they stay in L2 while every input row runs over them): a pair of input rows eight rows at
// a time (16 sums), a last single input row all 16 at once, so that each weight load feeds two or one products
// and each input load eight or sixteen. Tiles of more input rows were no faster.
//
// A width that is not a multiple of 32 ends with masked loads (zeros add nothing).
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr int64_t GEMV_ROW_MAX = 2;  // up to this many input rows, weight rows are read one at a time
constexpr int GEMV_CHAINS = 2;       // float32 sums in flight per input row on a weight row read alone
constexpr int GEMV_GROUP_ROWS = 16;  // beyond, weight rows read side by side

// A float32 rounded to the nearest bfloat16 (ties to even), as bits; NaN stays NaN.
static inline uint16_t bf16_bits(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// Where the sums go: float32 (rounded to bfloat16's precision when round_bf16) or bfloat16.
struct GemvOut {
    void* data;
    int64_t N;
    bool bf16, round_bf16;
    inline void store(int64_t m, int64_t r, float v) const {
        if (bf16) {
            static_cast<uint16_t*>(data)[m * N + r] = bf16_bits(v);
        } else if (round_bf16) {
            const uint32_t bits = (uint32_t)bf16_bits(v) << 16;
            std::memcpy(static_cast<float*>(data) + m * N + r, &bits, 4);
        } else {
            static_cast<float*>(data)[m * N + r] = v;
        }
    }
};

// The bias, float32 or bfloat16 (the checkpoint's linears keep theirs in the weight's dtype), or none.
struct GemvBias {
    const float* f32;
    const uint16_t* bf16;
    inline float at(int64_t r) const {
        if (f32) return f32[r];
        if (!bf16) return 0.f;
        const uint32_t bits = (uint32_t)bf16[r] << 16;
        float v;
        std::memcpy(&v, &bits, 4);
        return v;
    }
};

// Weight rows [r, r + R) against input rows [m0, m0 + MT), C independent float32 sums per pair taking the
// rows' 32-element pieces in turn (more than one where a row is read alone: enough to hide VDPBF16PS's
// latency). Each piece of the inputs is loaded once for the R rows, each piece of a row once for the MT inputs.
template <int R, int MT, int C = 1>
static void gemv_step(const uint16_t* x, const uint16_t* w, const GemvBias& bias, const GemvOut& out, int64_t K,
                      int64_t m0, int64_t r) {
    __m512 acc[R][MT][C];
    for (int i = 0; i < R; ++i)
        for (int m = 0; m < MT; ++m)
            for (int c = 0; c < C; ++c) acc[i][m][c] = _mm512_setzero_ps();
    const uint16_t* wr[R];
    for (int i = 0; i < R; ++i) wr[i] = w + (r + i) * K;
    const uint16_t* xm[MT];
    for (int m = 0; m < MT; ++m) xm[m] = x + (m0 + m) * K;
    int64_t k = 0;
    for (; k + 32 * C <= K; k += 32 * C)
        for (int c = 0; c < C; ++c) {
            __m512bh xv[MT];
            for (int m = 0; m < MT; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(xm[m] + k + 32 * c);
            for (int i = 0; i < R; ++i) {
                const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr[i] + k + 32 * c);
                for (int m = 0; m < MT; ++m) acc[i][m][c] = _mm512_dpbf16_ps(acc[i][m][c], wv, xv[m]);
            }
        }
    // The pieces left over (fewer than C), the last one masked where K is not a multiple of 32.
    for (; k < K; k += 32) {
        const __mmask32 mask = K - k >= 32 ? ~(__mmask32)0 : (__mmask32)((1ull << (K - k)) - 1);
        __m512bh xv[MT];
        for (int m = 0; m < MT; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(mask, xm[m] + k);
        for (int i = 0; i < R; ++i) {
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr[i] + k);
            for (int m = 0; m < MT; ++m) acc[i][m][0] = _mm512_dpbf16_ps(acc[i][m][0], wv, xv[m]);
        }
    }
    for (int i = 0; i < R; ++i)
        for (int m = 0; m < MT; ++m) {
            for (int c = 1; c < C; ++c) acc[i][m][0] = _mm512_add_ps(acc[i][m][0], acc[i][m][c]);
            out.store(m0 + m, r + i, _mm512_reduce_add_ps(acc[i][m][0]) + bias.at(r + i));
        }
}

// Rows [r0, r1) of the weight against every input row, the rows side by side: pairs of inputs, then a last
// single one.
static void gemv_rows(const uint16_t* x, const uint16_t* w, const GemvBias& bias, const GemvOut& out, int64_t M,
                      int64_t K, int64_t r0, int64_t r1) {
    const bool full = r1 - r0 == GEMV_GROUP_ROWS;
    int64_t m0 = 0;
    for (; m0 + 2 <= M; m0 += 2) {
        if (full) {
            gemv_step<GEMV_GROUP_ROWS / 2, 2>(x, w, bias, out, K, m0, r0);
            gemv_step<GEMV_GROUP_ROWS / 2, 2>(x, w, bias, out, K, m0, r0 + GEMV_GROUP_ROWS / 2);
        } else {
            for (int64_t r = r0; r < r1; ++r) gemv_step<1, 2>(x, w, bias, out, K, m0, r);
        }
    }
    if (m0 < M) {
        if (full) {
            gemv_step<GEMV_GROUP_ROWS, 1>(x, w, bias, out, K, m0, r0);
        } else {
            for (int64_t r = r0; r < r1; ++r) gemv_step<1, 1>(x, w, bias, out, K, m0, r);
        }
    }
}

// out = x . w^T + bias for x [M, K] and w [N, K] bfloat16, threaded over the weight's rows, each thread a
// contiguous range of them.
static void gemv(const uint16_t* x, const uint16_t* w, const GemvBias& bias, const GemvOut& out, int64_t M,
                 int64_t K, int64_t N) {
    if (M <= GEMV_ROW_MAX) {
        at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
            for (int64_t r = begin; r < end; ++r) {
                if (M == 1) gemv_step<1, 1, GEMV_CHAINS>(x, w, bias, out, K, 0, r);
                else gemv_step<1, 2, GEMV_CHAINS>(x, w, bias, out, K, 0, r);
            }
        });
        return;
    }
    const int64_t groups = (N + GEMV_GROUP_ROWS - 1) / GEMV_GROUP_ROWS;
    at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
        for (int64_t grp = begin; grp < end; ++grp)
            gemv_rows(x, w, bias, out, M, K, grp * GEMV_GROUP_ROWS, std::min(N, (grp + 1) * GEMV_GROUP_ROWS));
    });
}

// The bias of a linear as GemvBias reads it: float32, bfloat16 or none.
static GemvBias gemv_bias(const c10::optional<torch::Tensor>& bias, int64_t N) {
    GemvBias b{nullptr, nullptr};
    if (!bias.has_value()) return b;
    const torch::Tensor& t = *bias;
    TORCH_CHECK(t.is_contiguous() && t.numel() == N, "bias: contiguous, one value per weight row");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "bias: float32 or bfloat16");
    if (t.scalar_type() == at::kFloat) b.f32 = t.data_ptr<float>();
    else b.bf16 = reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
    return b;
}

// x [M, K] and w [N, K] contiguous bfloat16, bias [N] float32 or bfloat16 or none, out [M, N] contiguous
// float32 or bfloat16: out = x . w^T + bias, rounded to bfloat16 where out is bfloat16 or round_bf16.
void bf16_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, torch::Tensor out,
               bool round_bf16) {
    pybind11::gil_scoped_release no_gil;
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "inputs and weight disagree on K");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "x and w must be bfloat16");
    TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "inputs not contiguous");
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    const GemvBias b = gemv_bias(bias, N);
    TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.is_contiguous(), "bad out shape");
    TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16, "out: float32 or bfloat16");
    if (M == 0 || N == 0) return;
    const uint16_t* xptr = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    const uint16_t* wptr = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    gemv(xptr, wptr, b, GemvOut{out.data_ptr(), N, out.scalar_type() == at::kBFloat16, round_bf16}, M, K, N);
}
#else
void bf16_gemv(torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, torch::Tensor, bool) {
    TORCH_CHECK(false, "this build has no bfloat16 GEMV (no AVX512-BF16)");
}
#endif

// Whether bfloat16 inputs are multiplied as they are (else the caller converts them to float32).
bool native_bf16() { return HAS_BF16; }

// x [M, K] float32 (or bfloat16 where native_bf16()), blocks [N, K/32, 16] and scales [N, K/32] uint8, bias [N]
// float32 or empty: x . W^T + bias as [M, N] float32. With `paired` the blocks are in the row-pair layout
// (bfloat16 x only).
torch::Tensor mxfp4_linear(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales, torch::Tensor bias,
                           bool paired) {
    // Python threads (the server's event loop) run meanwhile, as they do beside torch's own ops.
    pybind11::gil_scoped_release no_gil;
    const int64_t N = blocks.size(0), G = blocks.size(1);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == G * 32, "inputs and weights disagree on K");
    TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                "x must be contiguous float32 or bfloat16");
    TORCH_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kByte, "MXFP4 must be uint8");
    TORCH_CHECK(blocks.is_contiguous() && scales.is_contiguous() && bias.is_contiguous(), "inputs not contiguous");
    TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.numel() == N), "bad bias");
    const uint8_t* bptr = blocks.data_ptr<uint8_t>();
    const uint8_t* sptr = scales.data_ptr<uint8_t>();
    const float* biasptr = bias.numel() ? bias.data_ptr<float>() : nullptr;
    TORCH_CHECK(!paired || (HAS_BF16 && x.scalar_type() == at::kBFloat16 && N % 2 == 0),
                "paired rows: an even number of them, bfloat16 inputs, native_bf16()");
    if (x.size(0) == 0) return torch::empty({0, N}, x.options().dtype(at::kFloat));
    if (x.scalar_type() == at::kBFloat16) return linear_bf16(x, bptr, sptr, biasptr, N, G, paired);
    return linear_f32(x, bptr, sptr, biasptr, N, G);
}

// One token through several experts' matrices at once (a batch-1 decode step's top-k experts): pair p multiplies
// input row x[p] (x[0] for every pair where x has one row) by expert experts[p]'s matrix into out[p], with bias
// [P, N] float32 (each pair's row) or empty. blocks [E, N, K/32, 16] and scales [E, N, K/32] are a layer's
// stacked experts (in the row-pair layout with `paired`). One parallel loop over every pair's rows, where one call
// per expert paid a call and a barrier each. Needs native_bf16().
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// The loop of mxfp4_experts_one on raw pointers: x [rows, G * 32] (rows 1 or P), bias [P, N] or null, out [P, N].
static void experts_one(const uint16_t* x, int64_t rows, const uint8_t* blocks, const uint8_t* scales,
                        const float* bias, const int64_t* experts, int64_t P, int64_t N, int64_t G, float* out,
                        bool paired) {
    const int64_t K = G * 32;
    std::vector<uint16_t> xq(rows * K);
    for (int64_t m = 0; m < rows; ++m) (paired ? paired_inputs : quad_inputs)(x + m * K, xq.data() + m * K, G);
    const int64_t groups = (N + ROWS_ONE - 1) / ROWS_ONE;
    at::parallel_for(0, P * groups, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t p = task / groups, e = experts[p], m = rows == 1 ? 0 : p;
            few_token_rows(blocks + e * N * G * 16, scales + e * N * G, xq.data() + m * K, x + m * K, 1,
                           bias ? bias + p * N : nullptr, out + p * N, G, N, (task % groups) * ROWS_ONE, paired);
        }
    });
}

torch::Tensor mxfp4_experts_one(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales, torch::Tensor bias,
                                torch::Tensor experts, bool paired) {
    pybind11::gil_scoped_release no_gil;
    TORCH_CHECK(blocks.dim() == 4 && blocks.size(3) == 16 && scales.dim() == 3,
                "blocks [E, N, G, 16], scales [E, N, G]");
    const int64_t E = blocks.size(0), N = blocks.size(1), G = blocks.size(2), P = experts.numel();
    TORCH_CHECK(scales.size(0) == E && scales.size(1) == N && scales.size(2) == G, "scales disagree with blocks");
    TORCH_CHECK(!paired || N % 2 == 0, "paired rows: an even number of them");
    TORCH_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kByte, "MXFP4 must be uint8");
    TORCH_CHECK(blocks.is_contiguous() && scales.is_contiguous(), "blocks and scales must be contiguous");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == G * 32 && (x.size(0) == 1 || x.size(0) == P), "x: [1 or P, K]");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bfloat16");
    TORCH_CHECK(experts.scalar_type() == at::kLong && experts.dim() == 1 && experts.is_contiguous(),
                "experts: int64 [P]");
    TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.dim() == 2 &&
                                      bias.size(0) == P && bias.size(1) == N),
                "bias: float32 [P, N]");
    const int64_t* eptr = experts.data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p) TORCH_CHECK(eptr[p] >= 0 && eptr[p] < E, "expert id out of range");
    auto out = torch::empty({P, N}, x.options().dtype(at::kFloat));
    if (P == 0 || N == 0) return out;
    experts_one(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), x.size(0), blocks.data_ptr<uint8_t>(),
                scales.data_ptr<uint8_t>(), bias.numel() ? bias.data_ptr<float>() : nullptr, eptr, P, N, G,
                out.data_ptr<float>(), paired);
    return out;
}
#else
torch::Tensor mxfp4_experts_one(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, bool) {
    TORCH_CHECK(false, "this build has no bfloat16 path");
}
#endif
