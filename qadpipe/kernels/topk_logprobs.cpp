// Top-k log-probs of [rows, vocab] logits in one call, on CPU: for each row the logsumexp, the
// given token's log-prob and rank, and the k largest log-probs with their ids -- what
// qadpipe.teacher.vllm_fused_logprobs otherwise computes with torch ops (tests hold both to an
// fp64 log_softmax).
//
// Why C++: torch's top-k is a partial sort of the whole row, and the compiled torch passes that
// did this before (logsumexp, then top-k from block maxima) ran 3-4x slower inside vLLM's CPU
// worker than alone.  Here a row is streamed once -- each 64-entry block's maximum, then, while
// the block is in L1, its exp-sum and rank count, vectorized -- and the top-k comes from the few
// blocks whose maximum can reach it (SmolLM2's 49k vocabulary, k=64, 2 threads: ~19 us a
// position against ~53 us for torch's logsumexp + topk).  No torch headers: it builds in ~2 s
// (qadpipe/kernels/build.py) and runs on torch's OpenMP threads.
//
// A row holding NaN or +inf gets NaN among its log-probs, as a log_softmax does (its ids then
// mean nothing; qadpipe's cache writer refuses NaN log-probs).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 64;              // vocabulary entries per block maximum
constexpr int64_t BINS = 1024;             // histogram of (row max - block max), for the threshold
constexpr float BINS_PER_NAT = 16.0f;
constexpr int64_t SMALL = 256;            // candidates placed by counting, not sorted

inline float as_float(float x) { return x; }
inline float as_float(uint16_t bf16) { return __builtin_bit_cast(float, uint32_t(bf16) << 16); }

// The order of non-NaN floats as int32 (-0 and +0 equal: adding +0 turns -0 into +0).
inline int32_t order_key(float f) {
    const int32_t i = __builtin_bit_cast(int32_t, f + 0.0f);
    return i ^ ((i >> 31) & 0x7fffffff);
}

// exp(x) for x <= 0, ~1 ulp (Cephes expf: 2^n exp(r), |r| <= ln2/2, degree-6 polynomial),
// written so that the compiler vectorizes it.  Below -87 (exp < 1.7e-38) it is 0: such terms
// vanish next to the row maximum's exp(0) = 1 in any fp32 sum.
inline float exp_nonpositive(float x) {
    const float clamped = x < -87.0f ? -87.0f : x;
    // Round to nearest by adding 1.5 * 2^23: n lands in the low mantissa bits.
    const float shifted = clamped * 1.44269504088896341f + 12582912.0f;
    const float n = shifted - 12582912.0f;
    float r = clamped - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t exponent = (__builtin_bit_cast(int32_t, shifted) - 0x4B400000 + 127) << 23;
    return x < -87.0f ? 0.0f : p * __builtin_bit_cast(float, exponent);
}

struct Candidate {
    int32_t key;
    int32_t id;
};
// Larger first; among equal values the lower id first (deterministic, unlike torch.topk's).
// Branch-free, so the counting placement below vectorizes.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
    return a.key > b.key || (a.key == b.key && a.id < b.id);
}

struct Scratch {
    explicit Scratch(int64_t vocab) : block_max(vocab / BLOCK), candidates(vocab) {}
    std::vector<float> block_max;
    std::vector<Candidate> candidates;
    int32_t histogram[BINS];
};

// A value t <= the k-th largest block maximum, so <= the k-th largest entry: the k largest
// entries are all >= t and lie in blocks whose maximum is >= t.  From a histogram of distances
// to the row maximum (a cheap stand-in for selecting the k-th block maximum), one bin lower
// for float rounding at the bin edges; -inf where the row maximum is not finite.
float threshold(Scratch& s, int64_t whole, int64_t k, float row_max) {
    if (!std::isfinite(row_max)) return -std::numeric_limits<float>::infinity();
    int32_t* histogram = s.histogram;
    std::fill(histogram, histogram + BINS, 0);
    for (int64_t b = 0; b < whole; ++b) {
        const float distance = (row_max - s.block_max[b]) * BINS_PER_NAT;   // >= 0; +inf for a block of -inf
        histogram[distance < float(BINS - 1) ? int64_t(distance) : BINS - 1] += 1;
    }
    int64_t seen = 0, bin = 0;
    for (; bin < BINS - 2; ++bin) {
        seen += histogram[bin];
        if (seen >= k) break;
    }
    return bin >= BINS - 2 ? -std::numeric_limits<float>::infinity() : row_max - float(bin + 2) / BINS_PER_NAT;
}

template <typename T>
void one_row(const T* row, int64_t vocab, int64_t k, int64_t token, Scratch& s,
             int32_t* ids, float* logprobs, int64_t* rank) {
    // One streaming pass: each block's maximum, then (while the block is in L1) its exp-sum
    // against the running maximum -- the sum so far rescaled when the maximum grows -- and how
    // many entries are >= the token's logit (vLLM's rank: ties counted, the best is 1).
    const int64_t whole = vocab / BLOCK;
    const float token_logit = as_float(row[token]);
    float row_max = -std::numeric_limits<float>::infinity();
    float shift = 0.0f;                                   // row_max, or 0 while it is infinite (as torch.logsumexp)
    double total = 0.0;
    int64_t at_least_token = 0;
    for (int64_t start = 0; start < vocab; start += BLOCK) {
        const T* block = row + start;
        const int64_t size = std::min(BLOCK, vocab - start);
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < size; ++j) m = std::max(m, as_float(block[j]));
        if (size == BLOCK) s.block_max[start / BLOCK] = m;
        if (m > row_max) {
            row_max = m;
            const float new_shift = std::isinf(m) ? 0.0f : m;
            total *= exp_nonpositive(std::min(0.0f, shift - new_shift));
            shift = new_shift;
        }
        float sum = 0.0f;
        int32_t count = 0;
#pragma omp simd reduction(+ : sum, count)
        for (int64_t j = 0; j < size; ++j) {
            const float x = as_float(block[j]);
            sum += exp_nonpositive(x - shift);
            count += x >= token_logit;
        }
        total += sum;
        at_least_token += count;
    }
    const float lse = row_max == std::numeric_limits<float>::infinity() ? row_max : shift + float(std::log(total));
    *rank = at_least_token;
    ids[0] = int32_t(token);
    logprobs[0] = token_logit - lse;

    // A row holding NaNs can keep fewer than k candidates (NaN is never >= t); its log-probs are
    // all NaN (so is lse), which the cache writer refuses, but every slot still needs an id in
    // range before the last loop reads the row at it.
    for (int64_t i = 1; i <= k; ++i) ids[i] = int32_t(i - 1);

    // Candidates: the entries >= t of the blocks whose maximum is >= t, and the partial block.
    const float t = threshold(s, whole, k, row_max);
    Candidate* kept = s.candidates.data();
    int64_t m = 0;
    for (int64_t b = 0; b < whole; ++b) {
        if (!(s.block_max[b] >= t)) continue;
        const T* block = row + b * BLOCK;
        for (int64_t j = 0; j < BLOCK; ++j) {
            const float x = as_float(block[j]);
            if (x >= t) kept[m++] = {order_key(x), int32_t(b * BLOCK + j)};
        }
    }
    for (int64_t j = whole * BLOCK; j < vocab; ++j) kept[m++] = {order_key(as_float(row[j])), int32_t(j)};
    if (m <= SMALL) {
        // Few candidates (about k on real logits): each one's place is the number ranking before
        // it -- m^2 branch-free comparisons, cheaper than a sort's mispredicted branches.
        for (int64_t i = 0; i < m; ++i) {
            const Candidate c = kept[i];
            int64_t place = 0;
#pragma omp simd reduction(+ : place)
            for (int64_t j = 0; j < m; ++j) place += ranks_before(kept[j], c);
            if (place < k) ids[1 + place] = c.id;
        }
    } else {
        const int64_t placed = std::min(k, m);
        std::partial_sort(kept, kept + placed, kept + m, ranks_before);
        for (int64_t i = 0; i < placed; ++i) ids[1 + i] = kept[i].id;
    }
    for (int64_t i = 1; i <= k; ++i) logprobs[i] = as_float(row[ids[i]]) - lse;
}

template <typename T>
void all_rows(const T* logits, int64_t rows, int64_t vocab, int64_t k, const int64_t* tokens,
              int32_t* ids, float* logprobs, int64_t* ranks, int threads) {
#pragma omp parallel num_threads(threads)
    {
        Scratch scratch(vocab);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r)
            one_row(logits + r * vocab, vocab, k, tokens[r], scratch, ids + r * (k + 1), logprobs + r * (k + 1),
                    ranks + r);
    }
}

}  // namespace

// Contiguous row-major inputs; ids/logprobs are [rows, k + 1] (the token first, then the top-k
// by descending log-prob), ranks [rows].  The caller checks 1 <= k <= vocab / 64.
extern "C" {
void qadpipe_topk_logprobs_bf16(const uint16_t* logits, int64_t rows, int64_t vocab, int64_t k,
                                const int64_t* tokens, int32_t* ids, float* logprobs, int64_t* ranks, int threads) {
    all_rows(logits, rows, vocab, k, tokens, ids, logprobs, ranks, threads);
}
void qadpipe_topk_logprobs_fp32(const float* logits, int64_t rows, int64_t vocab, int64_t k,
                                const int64_t* tokens, int32_t* ids, float* logprobs, int64_t* ranks, int threads) {
    all_rows(logits, rows, vocab, k, tokens, ids, logprobs, ranks, threads);
}
}
