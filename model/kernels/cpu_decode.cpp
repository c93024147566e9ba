// The rest of a CPU decode layer in a few calls: what the GEMV and the MXFP4 experts do not cover. Compiled after
// cpu_mxfp4.cpp in the same extension (model/kernels/cpu_mxfp4.py), whose GEMV (gemv), one-token expert rows
// (experts_one) and bfloat16 helpers these call.
//
// A decode step of one layer, as the model writes it in torch, is some sixty small operators around four weight
// reads; at batch 1 each costs more to dispatch than it computes. Here each part is one call:
// * norm_qkv_rope: the attention's RMSNorm, the QKV GEMV with its bias, RoPE on the query and key heads.
// * paged_attention: the new keys and values stored in their cache slots, then every token's attention over
//   the slots its sequence's block table lists, with the learned sink and the sliding window.
// * out_residual: the output GEMV with its bias, and the residual add.
// * norm_route: the MLP's RMSNorm, the router's GEMV, the top-k experts and their softmax.
// * experts_one_token: one token through its k experts (both MXFP4 matrices, SwiGLU, the weighted sum).
// Each rounds to bfloat16 where the model's plain forward does (the normalized rows, the projections' outputs,
// the rotated heads, the residual sums), so the results differ from it only in the order of float32 sums (the
// norm's mean, the attention's softmax); the twins are in model/kernels/fused_reference.py and
// model/kernels/attention.py. bfloat16 only, on CPUs with AVX512-BF16 (the GEMV's requirement).
#if defined(__AVX512BF16__) && defined(__AVX512BW__)

// A float32 or bfloat16 vector of n values (a norm's scale, the sinks), read as float32.
static GemvBias float_values(const torch::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.dim() == 1 && t.numel() == n && t.is_contiguous(), what, ": contiguous, ", n, " values");
    return gemv_bias(t, n);
}

static const uint16_t* bf16_ptr(const torch::Tensor& t) {
    return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

static uint16_t* bf16_ptr_mut(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

static void check_bf16_rows(const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), what,
                ": contiguous bfloat16 [rows, width]");
}

// 16 bfloat16 values (the first n of them; the rest read as zero) as float32 lanes.
static inline __m512 load_bf16x16(const uint16_t* p, int64_t n = 16) {
    const __mmask16 mask = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// e^x on float32 lanes: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact r), e^r by Cephes'
// polynomial, times 2^n. Over the softmax's range it stays within one ulp of e^x computed in double and rounded
// (checked every 1e-4 from -87 to 0).
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.9f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

// One row of the model's RMSNorm: x * (1 / sqrt(mean(x^2) + eps)), times scale, each step in float32 as the
// model's torch ops round them, then rounded to bfloat16. (The mean's sum runs in another order than torch's.)
static void rms_norm_row(const uint16_t* x, const GemvBias& scale, float eps, int64_t H, uint16_t* out) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < H; i += 16) {
        const __m512 v = load_bf16x16(x + i, H - i);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / (float)H + eps);
    for (int64_t i = 0; i < H; ++i) out[i] = bf16_bits((bf16_to_float(x[i]) * inv) * scale.at(i));
}

static void rms_norm_rows(const torch::Tensor& x, const torch::Tensor& scale, double eps, torch::Tensor& out) {
    const int64_t T = x.size(0), H = x.size(1);
    const GemvBias s = float_values(scale, H, "norm scale");
    for (int64_t t = 0; t < T; ++t) rms_norm_row(bf16_ptr(x) + t * H, s, (float)eps, H, bf16_ptr_mut(out) + t * H);
}

// x [T, H], norm_scale [H], w [N, H] with N = (heads + 2 kv_heads) D, bias [N] or none, cos and sin [T, D/2]
// float32: (q [T, heads, D], k [T, kv_heads, D], v [T, kv_heads, D]), views of one [T, N] bfloat16 tensor:
// RMSNorm(x) . w^T + bias rounded to bfloat16, then q's and k's heads rotated (pairs j, j + D/2) in float32 and
// rounded again, as the model's plain attention block does.
std::vector<torch::Tensor> norm_qkv_rope(torch::Tensor x, torch::Tensor norm_scale, double eps, torch::Tensor w,
                                         c10::optional<torch::Tensor> bias, torch::Tensor cos, torch::Tensor sin,
                                         int64_t heads, int64_t kv_heads) {
    pybind11::gil_scoped_release no_gil;
    check_bf16_rows(x, "x");
    check_bf16_rows(w, "qkv weight");
    TORCH_CHECK(heads > 0 && kv_heads > 0, "heads and kv_heads must be positive");
    const int64_t T = x.size(0), H = x.size(1), N = w.size(0), D = N / (heads + 2 * kv_heads);
    TORCH_CHECK(w.size(1) == H && D * (heads + 2 * kv_heads) == N && D % 2 == 0, "qkv weight does not fit x");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.numel() == T * D / 2 && sin.numel() == T * D / 2,
                "cos, sin: contiguous float32 [T, D/2]");
    auto t = torch::empty({T, H}, x.options());
    rms_norm_rows(x, norm_scale, eps, t);
    auto qkv = torch::empty({T, N}, x.options());
    uint16_t* out = bf16_ptr_mut(qkv);
    gemv(bf16_ptr(t), bf16_ptr(w), gemv_bias(bias, N), GemvOut{out, N, true, false}, T, H, N);
    const int64_t half = D / 2;
    const float* c = cos.data_ptr<float>();
    const float* s = sin.data_ptr<float>();
    for (int64_t m = 0; m < T; ++m)
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
            uint16_t* head = out + m * N + h * D;
            for (int64_t j = 0; j < half; ++j) {
                const float x1 = bf16_to_float(head[j]), x2 = bf16_to_float(head[j + half]);
                const float cj = c[m * half + j], sj = s[m * half + j];
                head[j] = bf16_bits(x1 * cj - x2 * sj);
                head[j + half] = bf16_bits(x2 * cj + x1 * sj);
            }
        }
    return {qkv.narrow(1, 0, heads * D).view({T, heads, D}),
            qkv.narrow(1, heads * D, kv_heads * D).view({T, kv_heads, D}),
            qkv.narrow(1, (heads + kv_heads) * D, kv_heads * D).view({T, kv_heads, D})};
}

// One token's group of G query heads (sharing key head kvh) over the n key slots it sees: logits q.k * scale,
// a softmax whose denominator also holds each head's sink, the values weighted by it. q: the G heads, D apart;
// out: their G outputs, D apart, rounded to bfloat16. logits: scratch for G * n floats.
static void attend_group(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, int64_t kv_heads, int64_t kvh,
                         int64_t D, const int64_t* slots, int64_t n, const float* sinks, float scale, int64_t G,
                         float* logits, uint16_t* out) {
    for (int64_t i = 0; i < n; ++i) {
        const uint16_t* key = kc + (slots[i] * kv_heads + kvh) * D;
        for (int64_t g = 0; g < G; ++g) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 32)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + g * D + d),
                                       (__m512bh)_mm512_loadu_si512(key + d));
            logits[g * n + i] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        float* l = logits + g * n;
        __m512 top = _mm512_set1_ps(sinks[g]);
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 mask = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
            top = _mm512_mask_max_ps(top, mask, top, _mm512_maskz_loadu_ps(mask, l + i));
        }
        const float m = _mm512_reduce_max_ps(top);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 mask = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, l + i), _mm512_set1_ps(m)));
            _mm512_mask_storeu_ps(l + i, mask, e);
            sum = _mm512_mask_add_ps(sum, mask, sum, e);
        }
        const float inv = 1.f / (_mm512_reduce_add_ps(sum) + std::exp(sinks[g] - m));
        __m512 acc[8];  // D <= 128
        for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; ++i) {
            const __m512 p = _mm512_set1_ps(l[i]);
            const uint16_t* value = vc + (slots[i] * kv_heads + kvh) * D;
            for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_fmadd_ps(p, load_bf16x16(value + c * 16), acc[c]);
        }
        for (int64_t c = 0; c < D / 16; ++c)
            _mm256_storeu_si256((__m256i*)(out + g * D + c * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[c], _mm512_set1_ps(inv))));
    }
}

// attend_group for a group of G query heads (G dividing 16) of D dimensions (32, 64 or 128), with the work laid
// out for the vector unit: two heads share each VDPBF16PS (their queries side by side, 16 of the key's
// dimensions broadcast to both halves), so a key's G logits take one horizontal reduction per pair of heads
// instead of one per head; the logits are kept key-major (G to a key) so that the softmax runs on whole vectors
// of 16 / G keys at once; and the values are converted once per key and group of heads. The same sums as
// attend_group, in another order. logits: scratch for G * n floats.
template <int D, int G>
static void attend_group_fast(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, int64_t kv_heads,
                              int64_t kvh, const int64_t* slots, int64_t n, const float* sinks, float scale,
                              float* logits, uint16_t* out) {
    static_assert(D % 32 == 0 && D <= 128 && G % 2 == 0 && 16 % G == 0, "head_dim or group unsupported");
    constexpr int C = D / 16, P = G / 2;
    __m512i qp[P][C];  // heads 2j and 2j + 1, dimensions 16c to 16c + 15, side by side
    for (int j = 0; j < P; ++j)
        for (int c = 0; c < C; ++c)
            qp[j][c] = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(q + (2 * j) * D + 16 * c))),
                _mm256_loadu_si256((const __m256i*)(q + (2 * j + 1) * D + 16 * c)), 1);
    for (int64_t i = 0; i < n; ++i) {
        const uint16_t* key = kc + (slots[i] * kv_heads + kvh) * D;
        __m512i kb[C];
        for (int c = 0; c < C; ++c) kb[c] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(key + 16 * c)));
        for (int j = 0; j < P; ++j) {
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < C; ++c) acc = _mm512_dpbf16_ps(acc, (__m512bh)qp[j][c], (__m512bh)kb[c]);
            // Each half's 8 lanes to one sum, in every lane of the half: lane 0 holds head 2j's, lane 8 head 2j+1's.
            acc = _mm512_add_ps(acc, _mm512_shuffle_f32x4(acc, acc, 0xB1));
            acc = _mm512_add_ps(acc, _mm512_permute_ps(acc, 0x4E));
            acc = _mm512_add_ps(acc, _mm512_permute_ps(acc, 0xB1));
            logits[i * G + 2 * j] = _mm512_cvtss_f32(acc) * scale;
            logits[i * G + 2 * j + 1] = _mm_cvtss_f32(_mm512_extractf32x4_ps(acc, 2)) * scale;
        }
    }
    // The softmax per head over the key-major logits, 16 / G keys per vector; lane l belongs to head l % G.
    const int64_t total = n * G;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < total; i += 16) {
        const __mmask16 mask = total - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (total - i)) - 1);
        top = _mm512_mask_max_ps(top, mask, top, _mm512_maskz_loadu_ps(mask, logits + i));
    }
    alignas(64) float lanes[16], m[G], denom[G];
    _mm512_store_ps(lanes, top);
    for (int g = 0; g < G; ++g) {
        m[g] = sinks[g];
        for (int l = g; l < 16; l += G) m[g] = std::max(m[g], lanes[l]);
    }
    for (int l = 0; l < 16; ++l) lanes[l] = m[l % G];
    const __m512 m_v = _mm512_load_ps(lanes);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < total; i += 16) {
        const __mmask16 mask = total - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (total - i)) - 1);
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, logits + i), m_v));
        _mm512_mask_storeu_ps(logits + i, mask, e);
        sum = _mm512_mask_add_ps(sum, mask, sum, e);
    }
    _mm512_store_ps(lanes, sum);
    for (int g = 0; g < G; ++g) {
        float total_g = 0.f;
        for (int l = g; l < 16; l += G) total_g += lanes[l];
        denom[g] = 1.f / (total_g + std::exp(sinks[g] - m[g]));
    }
    // The values weighted by the probabilities, HG heads at a time (their sums in 16 registers at most).
    constexpr int V = D / 16, HG = G < 256 / D ? G : 256 / D;
    for (int h0 = 0; h0 < G; h0 += HG) {
        __m512 acc[HG][V];
        for (int h = 0; h < HG; ++h)
            for (int c = 0; c < V; ++c) acc[h][c] = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; ++i) {
            const uint16_t* value = vc + (slots[i] * kv_heads + kvh) * D;
            __m512 vf[V];
            for (int c = 0; c < V; ++c) vf[c] = load_bf16x16(value + c * 16);
            for (int h = 0; h < HG; ++h) {
                const __m512 p = _mm512_set1_ps(logits[i * G + h0 + h]);
                for (int c = 0; c < V; ++c) acc[h][c] = _mm512_fmadd_ps(p, vf[c], acc[h][c]);
            }
        }
        for (int h = 0; h < HG; ++h)
            for (int c = 0; c < V; ++c)
                _mm256_storeu_si256(
                    (__m256i*)(out + (h0 + h) * D + c * 16),
                    (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[h][c], _mm512_set1_ps(denom[h0 + h]))));
    }
}

using AttendFn = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, int64_t, int64_t, const int64_t*,
                          int64_t, const float*, float, float*, uint16_t*);

// The attend_group_fast for (D, G), or null where it has none.
static AttendFn attend_fast_for(int64_t D, int64_t G) {
#define ATTEND_FAST_FOR(d)                                         \
    if (D == d) {                                                  \
        if (G == 2) return attend_group_fast<d, 2>;                \
        if (G == 4) return attend_group_fast<d, 4>;                \
        if (G == 8) return attend_group_fast<d, 8>;                \
        if (G == 16) return attend_group_fast<d, 16>;              \
    }
    ATTEND_FAST_FOR(32)
    ATTEND_FAST_FOR(64)
    ATTEND_FAST_FOR(128)
#undef ATTEND_FAST_FOR
    return nullptr;
}

// The model's attention seam over a paged cache (model/kernels/attention.py has its twin): q [T, heads, D] and
// the new k, v [T, kv_heads, D] (rows may be strided), k_cache and v_cache [slots, kv_heads, D] bfloat16,
// slot_mapping [T] (where each new key and value go), block_index [S, W] and key_positions [S, W * block_size]
// (the blocks each sequence reads and the position each of their slots holds, -1 for none), seq_index and
// positions [T], window (0: full attention), sinks [heads]. Stores the new keys and values, then each token
// attends to its sequence's slots at positions p' with p' <= p (and p' > p - window), so a chunk's tokens see
// each other. Returns [T, heads * D] bfloat16.
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache,
                              torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor block_index,
                              torch::Tensor key_positions, torch::Tensor seq_index, torch::Tensor positions,
                              int64_t block_size, int64_t window, torch::Tensor sinks, double scale) {
    pybind11::gil_scoped_release no_gil;
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v: [T, heads, D]");
    const int64_t T = q.size(0), heads = q.size(1), D = q.size(2), kv_heads = k.size(1);
    TORCH_CHECK(D % 32 == 0 && D <= 128, "head_dim must be a multiple of 32, at most 128");
    TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads must be a multiple of key heads");
    for (const torch::Tensor* t : {&q, &k, &v})
        TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->size(0) == T && t->size(2) == D && t->stride(2) == 1 &&
                        t->stride(1) == D,
                    "q, k, v: bfloat16, heads contiguous");
    TORCH_CHECK(k.sizes() == v.sizes(), "k and v differ in shape");
    TORCH_CHECK(k_cache.dim() == 3 && k_cache.size(1) == kv_heads && k_cache.size(2) == D &&
                    k_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() &&
                    v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kBFloat16 &&
                    v_cache.is_contiguous(),
                "caches: contiguous bfloat16 [slots, kv_heads, D]");
    for (const torch::Tensor* t : {&slot_mapping, &block_index, &key_positions, &seq_index, &positions})
        TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "tables and positions: contiguous int64");
    const int64_t slots = k_cache.size(0), S = block_index.size(0), W = block_index.size(1);
    const int64_t L = key_positions.size(1);
    TORCH_CHECK(block_index.dim() == 2 && key_positions.dim() == 2 && key_positions.size(0) == S &&
                    L == W * block_size && block_size > 0,
                "block_index [S, W], key_positions [S, W * block_size]");
    TORCH_CHECK(slot_mapping.numel() == T && seq_index.numel() == T && positions.numel() == T,
                "slot_mapping, seq_index, positions: one per token");
    const int64_t* slot_of = slot_mapping.data_ptr<int64_t>();
    const int64_t* blocks = block_index.data_ptr<int64_t>();
    const int64_t* key_pos = key_positions.data_ptr<int64_t>();
    const int64_t* seq = seq_index.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t i = 0; i < S * W; ++i)
        TORCH_CHECK(blocks[i] >= 0 && (blocks[i] + 1) * block_size <= slots, "block index out of the cache");
    for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK(slot_of[t] >= 0 && slot_of[t] < slots && seq[t] >= 0 && seq[t] < S, "slot or sequence out of range");
    const GemvBias sink = float_values(sinks, heads, "sinks");
    uint16_t* kc = bf16_ptr_mut(k_cache);
    uint16_t* vc = bf16_ptr_mut(v_cache);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < kv_heads; ++h) {
            std::memcpy(kc + (slot_of[t] * kv_heads + h) * D, bf16_ptr(k) + t * k.stride(0) + h * D, D * 2);
            std::memcpy(vc + (slot_of[t] * kv_heads + h) * D, bf16_ptr(v) + t * v.stride(0) + h * D, D * 2);
        }
    auto out = torch::empty({T, heads * D}, q.options());
    uint16_t* optr = bf16_ptr_mut(out);
    const uint16_t* qptr = bf16_ptr(q);
    const int64_t G = heads / kv_heads, q_stride = q.stride(0);
    const AttendFn fast = attend_fast_for(D, G);
    at::parallel_for(0, T * kv_heads, 1, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> seen;
        std::vector<float> logits, group_sinks(G);
        for (int64_t task = begin; task < end; ++task) {
            const int64_t t = task / kv_heads, kvh = task % kv_heads, s = seq[t], p = pos[t];
            seen.clear();
            for (int64_t j = 0; j < L; ++j) {
                const int64_t kp = key_pos[s * L + j];
                if (kp < 0 || kp > p || (window > 0 && kp <= p - window)) continue;
                seen.push_back(blocks[s * W + j / block_size] * block_size + j % block_size);
            }
            const int64_t n = (int64_t)seen.size();
            logits.resize(G * std::max<int64_t>(n, 1));
            for (int64_t g = 0; g < G; ++g) group_sinks[g] = sink.at(kvh * G + g);
            const uint16_t* qg = qptr + t * q_stride + kvh * G * D;
            uint16_t* og = optr + t * heads * D + kvh * G * D;
            if (fast != nullptr)
                fast(qg, kc, vc, kv_heads, kvh, seen.data(), n, group_sinks.data(), (float)scale, logits.data(), og);
            else
                attend_group(qg, kc, vc, kv_heads, kvh, D, seen.data(), n, group_sinks.data(), (float)scale, G,
                             logits.data(), og);
        }
    });
    return out;
}

// a [T, K], w [N, K], bias [N] or none, x [T, N], all bfloat16: x + (a . w^T + bias), the product rounded to
// bfloat16 and then the sum, as the model's attention block adds its output projection to the residual.
torch::Tensor out_residual(torch::Tensor a, torch::Tensor w, c10::optional<torch::Tensor> bias, torch::Tensor x) {
    pybind11::gil_scoped_release no_gil;
    check_bf16_rows(a, "a");
    check_bf16_rows(w, "out weight");
    check_bf16_rows(x, "x");
    const int64_t T = a.size(0), K = a.size(1), N = w.size(0);
    TORCH_CHECK(w.size(1) == K && x.size(0) == T && x.size(1) == N, "out weight does not fit a and x");
    auto out = torch::empty_like(x);
    uint16_t* optr = bf16_ptr_mut(out);
    gemv(bf16_ptr(a), bf16_ptr(w), gemv_bias(bias, N), GemvOut{optr, N, true, false}, T, K, N);
    const uint16_t* xptr = bf16_ptr(x);
    for (int64_t i = 0; i < T * N; ++i) optr[i] = bf16_bits(bf16_to_float(xptr[i]) + bf16_to_float(optr[i]));
    return out;
}

// x [T, H], norm_scale [H], w [E, H], bias [E] or none: (t, indices, weights) with t = RMSNorm(x) [T, H], each
// token's top_k experts by router logit (rounded to bfloat16 as the model's router rounds them; highest first,
// ties to the lower expert) as int64 [T, top_k], and the softmax over those k logits, bfloat16 [T, top_k].
std::vector<torch::Tensor> norm_route(torch::Tensor x, torch::Tensor norm_scale, double eps, torch::Tensor w,
                                      c10::optional<torch::Tensor> bias, int64_t top_k) {
    pybind11::gil_scoped_release no_gil;
    check_bf16_rows(x, "x");
    check_bf16_rows(w, "router weight");
    const int64_t T = x.size(0), H = x.size(1), E = w.size(0);
    TORCH_CHECK(w.size(1) == H && top_k > 0 && top_k <= E, "router weight or top_k does not fit x");
    auto t = torch::empty({T, H}, x.options());
    rms_norm_rows(x, norm_scale, eps, t);
    std::vector<uint16_t> logits(T * E);
    gemv(bf16_ptr(t), bf16_ptr(w), gemv_bias(bias, E), GemvOut{logits.data(), E, true, false}, T, H, E);
    auto indices = torch::empty({T, top_k}, x.options().dtype(at::kLong));
    auto weights = torch::empty({T, top_k}, x.options());
    int64_t* iptr = indices.data_ptr<int64_t>();
    uint16_t* wptr = bf16_ptr_mut(weights);
    std::vector<int64_t> order(E);
    std::vector<float> e(top_k);
    for (int64_t m = 0; m < T; ++m) {
        const uint16_t* l = logits.data() + m * E;
        for (int64_t e = 0; e < E; ++e) order[e] = e;
        std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int64_t a, int64_t b) {
            const float la = bf16_to_float(l[a]), lb = bf16_to_float(l[b]);
            return la > lb || (la == lb && a < b);
        });
        const float top = bf16_to_float(l[order[0]]);
        float sum = 0.f;
        for (int64_t j = 0; j < top_k; ++j) sum += e[j] = std::exp(bf16_to_float(l[order[j]]) - top);
        for (int64_t j = 0; j < top_k; ++j) {
            iptr[m * top_k + j] = order[j];
            wptr[m * top_k + j] = bf16_bits(e[j] / sum);
        }
    }
    return {t, indices, weights};
}

// One token t [1, H] through its k experts (indices, weights [1, k]): mlp2(swiglu(mlp1(t))) per expert,
// weighted and summed, bfloat16 [1, H]. up_* and down_* are the layer's stacked MXFP4 experts (blocks
// [E, N, G, 16], in the row-pair layout with up_paired / down_paired; scales [E, N, G]) and their biases
// [E, N]. The same values, bit for bit, as the grouped path's (model/kernels/experts.py) on the same layouts:
// the experts in ascending order, each matrix's sums rounded to bfloat16, SwiGLU by the same torch operators,
// each weighted row rounded, their sum in float32 rounded once.
torch::Tensor experts_one_token(torch::Tensor t, torch::Tensor up_blocks, torch::Tensor up_scales,
                                torch::Tensor up_bias, torch::Tensor down_blocks, torch::Tensor down_scales,
                                torch::Tensor down_bias, torch::Tensor indices, torch::Tensor weights, double alpha,
                                double limit, bool up_paired, bool down_paired) {
    pybind11::gil_scoped_release no_gil;
    check_bf16_rows(t, "t");
    TORCH_CHECK(t.size(0) == 1, "t: one token");
    TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 && indices.size(0) == 1 &&
                    weights.scalar_type() == at::kBFloat16 && weights.sizes() == indices.sizes(),
                "indices int64 and weights bfloat16, [1, k]");
    for (const torch::Tensor* b : {&up_blocks, &down_blocks})
        TORCH_CHECK(b->dim() == 4 && b->size(3) == 16 && b->scalar_type() == at::kByte && b->is_contiguous(),
                    "blocks: contiguous uint8 [E, N, G, 16]");
    for (const torch::Tensor* s : {&up_scales, &down_scales})
        TORCH_CHECK(s->dim() == 3 && s->scalar_type() == at::kByte && s->is_contiguous(), "scales: uint8 [E, N, G]");
    const int64_t E = up_blocks.size(0), H = t.size(1), N1 = up_blocks.size(1), N2 = down_blocks.size(1);
    const int64_t P = indices.size(1);
    TORCH_CHECK(up_blocks.size(2) * 32 == H && N1 % 2 == 0 && down_blocks.size(2) * 32 == N1 / 2 && N2 == H &&
                    down_blocks.size(0) == E && up_scales.size(0) == E && up_scales.size(1) == N1 &&
                    up_scales.size(2) == up_blocks.size(2) && down_scales.size(0) == E && down_scales.size(1) == N2 &&
                    down_scales.size(2) == down_blocks.size(2),
                "expert matrices do not fit t");
    TORCH_CHECK(!down_paired || N2 % 2 == 0, "paired rows: an even number of them");
    TORCH_CHECK(up_bias.dim() == 2 && up_bias.size(0) == E && up_bias.size(1) == N1 && down_bias.dim() == 2 &&
                    down_bias.size(0) == E && down_bias.size(1) == N2,
                "biases: [E, N]");
    std::vector<std::pair<int64_t, int64_t>> sorted(P);  // (expert, its place among the token's k)
    const int64_t* iptr = indices.data_ptr<int64_t>();
    for (int64_t j = 0; j < P; ++j) {
        TORCH_CHECK(iptr[j] >= 0 && iptr[j] < E, "expert id out of range");
        sorted[j] = {iptr[j], j};
    }
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> ids(P);
    for (int64_t p = 0; p < P; ++p) ids[p] = sorted[p].first;
    TORCH_CHECK(up_bias.is_contiguous() && down_bias.is_contiguous(), "biases must be contiguous");
    const GemvBias up_b = gemv_bias(up_bias.view({-1}), E * N1), down_b = gemv_bias(down_bias.view({-1}), E * N2);
    std::vector<float> bias1(P * N1), bias2(P * N2);  // each pair's bias row, as the kernel reads it
    for (int64_t p = 0; p < P; ++p) {
        for (int64_t r = 0; r < N1; ++r) bias1[p * N1 + r] = up_b.at(ids[p] * N1 + r);
        for (int64_t r = 0; r < N2; ++r) bias2[p * N2 + r] = down_b.at(ids[p] * N2 + r);
    }
    std::vector<float> h(P * N1);
    experts_one(bf16_ptr(t), 1, up_blocks.data_ptr<uint8_t>(), up_scales.data_ptr<uint8_t>(), bias1.data(), ids.data(),
                P, N1, up_blocks.size(2), h.data(), up_paired);
    // SwiGLU over the interleaved columns (gate even, up odd) of h rounded to bfloat16, each torch operator of
    // model.kernels.experts.swiglu rounding to bfloat16 in turn; the sigmoid itself is torch's, so that its
    // exponential is the very one the plain path uses.
    const int64_t I = N1 / 2;
    auto scaled = torch::empty({P, I}, t.options());
    uint16_t* sptr = bf16_ptr_mut(scaled);
    std::vector<uint16_t> gate(P * I), up(P * I);
    const float lim = (float)limit, alph = (float)alpha;
    for (int64_t i = 0; i < P * I; ++i) {
        const float g = bf16_to_float(bf16_bits(h[2 * i])), u = bf16_to_float(bf16_bits(h[2 * i + 1]));
        gate[i] = bf16_bits(std::min(g, lim));
        up[i] = bf16_bits(std::max(std::min(u, lim), -lim));
        sptr[i] = bf16_bits(bf16_to_float(gate[i]) * alph);
    }
    const auto sig = at::sigmoid(scaled);
    const uint16_t* sig_ptr = bf16_ptr(sig);
    std::vector<uint16_t> a(P * I);
    for (int64_t i = 0; i < P * I; ++i) {
        const float gated = bf16_to_float(bf16_bits(bf16_to_float(gate[i]) * bf16_to_float(sig_ptr[i])));
        a[i] = bf16_bits(gated * bf16_to_float(bf16_bits(bf16_to_float(up[i]) + 1.f)));
    }
    std::vector<float> y(P * N2);
    experts_one(a.data(), P, down_blocks.data_ptr<uint8_t>(), down_scales.data_ptr<uint8_t>(), bias2.data(),
                ids.data(), P, N2, down_blocks.size(2), y.data(), down_paired);
    auto out = torch::empty({1, H}, t.options());
    uint16_t* optr = bf16_ptr_mut(out);
    const float* yptr = y.data();
    const uint16_t* wptr = bf16_ptr(weights);
    std::vector<float> sum(H, 0.f);  // index_add_ into bfloat16 sums in float32 and rounds once
    for (int64_t p = 0; p < P; ++p) {
        const float w = bf16_to_float(wptr[sorted[p].second]);
        for (int64_t i = 0; i < H; ++i)
            sum[i] += bf16_to_float(bf16_bits(bf16_to_float(bf16_bits(yptr[p * H + i])) * w));
    }
    for (int64_t i = 0; i < H; ++i) optr[i] = bf16_bits(sum[i]);
    return out;
}
#else
std::vector<torch::Tensor> norm_qkv_rope(torch::Tensor, torch::Tensor, double, torch::Tensor,
                                         c10::optional<torch::Tensor>, torch::Tensor, torch::Tensor, int64_t, int64_t) {
    TORCH_CHECK(false, "this build has no bfloat16 decode layer (no AVX512-BF16)");
}
torch::Tensor paged_attention(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                              torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t,
                              torch::Tensor, double) {
    TORCH_CHECK(false, "this build has no bfloat16 decode layer (no AVX512-BF16)");
}
torch::Tensor out_residual(torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, torch::Tensor) {
    TORCH_CHECK(false, "this build has no bfloat16 decode layer (no AVX512-BF16)");
}
std::vector<torch::Tensor> norm_route(torch::Tensor, torch::Tensor, double, torch::Tensor,
                                      c10::optional<torch::Tensor>, int64_t) {
    TORCH_CHECK(false, "this build has no bfloat16 decode layer (no AVX512-BF16)");
}
torch::Tensor experts_one_token(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                                torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, double, double, bool,
                                bool) {
    TORCH_CHECK(false, "this build has no bfloat16 decode layer (no AVX512-BF16)");
}
#endif
