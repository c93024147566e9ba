// Grammar masks on logits in host memory. Built by model/kernels/token_bitmask.py.
//
// A mask row packs one bit per token, llguidance's layout: bit i of word j allows token 32·j + i. A grammar
// mostly allows almost every token (free text, a JSON string: a few thousand forbidden, scattered) or almost
// none (JSON structure, a harmony header: whole words of zeros), so the loop goes by word: an all-ones word
// (every token allowed) is skipped, an all-zeros word writes 32 -inf in a row, and a mixed word writes -inf
// at each of its zero bits, found by counting trailing zeros. Only the forbidden logits are written; a
// masked fill over every logit would branch on each bit, mispredicting on scattered ones.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <limits>

template <typename T>
static void mask_row(T* row, const uint32_t* words, int64_t vocab) {
    const T ninf = static_cast<T>(-std::numeric_limits<float>::infinity());
    const int64_t whole = vocab / 32;
    for (int64_t w = 0; w < whole; ++w) {
        uint32_t forbidden = ~words[w];
        if (forbidden == 0) continue;
        T* at = row + w * 32;
        if (forbidden == 0xFFFFFFFFu) {
            for (int b = 0; b < 32; ++b) at[b] = ninf;
            continue;
        }
        for (; forbidden != 0; forbidden &= forbidden - 1) at[__builtin_ctz(forbidden)] = ninf;
    }
    // The last word may name tokens past the model's rows: only the bits under `vocab` count.
    for (int64_t token = whole * 32; token < vocab; ++token)
        if (!((words[whole] >> (token - whole * 32)) & 1u)) row[token] = ninf;
}

void apply_bitmask(torch::Tensor logits, torch::Tensor masks) {
    TORCH_CHECK(logits.device().is_cpu() && masks.device().is_cpu(), "the logits and masks are on the host");
    TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "the logits are a contiguous [batch, vocab] tensor");
    TORCH_CHECK(masks.dim() == 2 && masks.is_contiguous() && masks.scalar_type() == at::kInt,
                "the masks are a contiguous int32 [batch, words] tensor");
    const int64_t batch = logits.size(0), vocab = logits.size(1), words = masks.size(1);
    TORCH_CHECK(masks.size(0) == batch, "one mask row per logits row");
    TORCH_CHECK(words * 32 >= vocab, "a mask covers every token the model has");
    const uint32_t* packed = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "apply_bitmask", [&] {
        scalar_t* out = logits.data_ptr<scalar_t>();
        // Python threads (the server's event loop) run meanwhile: nothing here touches a Python object.
        pybind11::gil_scoped_release no_gil;
        at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
            for (int64_t r = begin; r < end; ++r) mask_row(out + r * vocab, packed + r * words, vocab);
        });
    });
}
