// The fused MXFP4 matmul of the CPU experts. Built by model/kernels/cpu_mxfp4.py, which fills in the e2m1 table,
// the scale bias and the token tile from its Python definitions before compiling.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static float FP4[16] = {FP4_VALUES};
static float POW2[256];
static bool POW2_READY = [] {
    for (int s = 0; s < 256; ++s) POW2[s] = (float)std::ldexp(1.0, s - SCALE_BIAS);
    return true;
}();

// Rows [r0, r1) of out[m0:m0+MT] = x[m0:m0+MT] . W^T (+ bias), W in MXFP4. xp [G, M, 32] holds the inputs
// block by block, all tokens' 32 values of a block together, each as its 16 even elements then its 16 odd ones.
template <int MT>
static void tile(const float* xp, const uint8_t* blocks, const uint8_t* scales, const float* bias, float* out,
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
static const TileFn TILES[TILE_MAX] = {tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

// x [M, K] float32, blocks [N, K/32, 16] and scales [N, K/32] uint8, bias [N] float32 or empty: x . W^T + bias
// as [M, N] float32.
torch::Tensor mxfp4_linear(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales, torch::Tensor bias) {
    // Python threads (the server's event loop) run meanwhile, as they do beside torch's own ops.
    pybind11::gil_scoped_release no_gil;
    const int64_t M = x.size(0), N = blocks.size(0), G = blocks.size(1);
    TORCH_CHECK(x.size(1) == G * 32, "inputs and weights disagree on K");
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32");
    TORCH_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kByte, "MXFP4 must be uint8");
    TORCH_CHECK(blocks.is_contiguous() && scales.is_contiguous() && bias.is_contiguous(), "inputs not contiguous");
    TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.numel() == N), "bad bias");
    // Evens then odds per block, so the decoded low and high nibbles meet contiguous inputs; block-major, so
    // the tokens of a tile read one contiguous run per block.
    auto xp = x.reshape({M, G, 16, 2}).permute({1, 0, 3, 2}).contiguous();
    auto out = torch::empty({M, N}, x.options());
    const float* xptr = xp.data_ptr<float>();
    const uint8_t* bptr = blocks.data_ptr<uint8_t>();
    const uint8_t* sptr = scales.data_ptr<uint8_t>();
    const float* biasptr = bias.numel() ? bias.data_ptr<float>() : nullptr;
    float* optr = out.data_ptr<float>();
    // About 64 KB of packed weights per task, reused by every token tile while it sits in the cache.
    const int64_t grain = std::max<int64_t>(1, 65536 / (G * 17));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r0 = begin; r0 < end; r0 += grain) {
            const int64_t r1 = std::min(end, r0 + grain);
            for (int64_t m0 = 0; m0 < M; m0 += TILE_MAX) {
                const int64_t mt = std::min<int64_t>(TILE_MAX, M - m0);
                TILES[mt - 1](xptr, bptr, sptr, biasptr, optr, G, N, M, m0, r0, r1);
            }
        }
    });
    return out;
}
