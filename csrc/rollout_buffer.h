// PPO bookkeeping between generation and the update, as a plain C++17 library:
// the fast path of the plain-torch definitions in minirlhf/stages/ppo.py.
// per_token_rewards, gae and whiten compute what the torch functions of the same
// names compute, from the same arguments (`--ppo.bookkeeping cpp|torch` picks
// one; tests/rollout compares them); masked_moments gives whitening the
// statistics of a batch split over ranks, and minibatch_order shuffles an epoch.
//
// Checks.  The caller's arrays arrive as `Array`s, described by the bindings
// without being looked at; this library checks everything, once: dtype, shape,
// layout, every length, every number it reads (finite) and every scalar.  A bad
// input throws std::invalid_argument (ValueError in Python) that names the
// argument and the offending row, e.g. "lengths[3]=70 exceeds T=64" or
// "logprobs[2, 1]=nan is not finite".  Values are checked row by row during the
// computation, while the row is in cache; the first bad row (in row order) is
// reported.
//
// Layout.  Per-token arrays are right-padded, row-major (B, T) float32: response
// token t of sequence b sits at [b * T + t] for t < lengths[b], and
// 1 <= lengths[b] <= T.  Padding is never read (it may hold NaN) and is 0 in
// every output.  Results come back as new arrays the caller owns (`Owned`).
//
// Threads.  Work is split over sequences on std::threads (see set_num_threads);
// results do not depend on the number of threads.  Nothing here touches Python,
// so the bindings call it with the GIL released.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace minirlhf {

// ---------------------------------------------------------------- arrays in and out

enum class DType { float32, int64, boolean, other };

// An argument as the caller handed it in, before anything is known to be right.
struct Array {
    bool is_array = false;           // false: something else (see `what`)
    const void* data = nullptr;
    DType dtype = DType::other;
    std::vector<int64_t> shape;
    bool standard_layout = false;    // C-contiguous, aligned, native byte order
    std::string what;                // for messages: what it is ("list"), or its dtype when other ("float64")
};

// A new C-contiguous array of the given shape, owned by the caller.
template <typename T>
struct Owned {
    std::unique_ptr<T[]> data;
    std::vector<int64_t> shape;
};

// ---------------------------------------------------------------- the bookkeeping

// Per-token rewards (Ouyang et al. 2022, eq. 2; Ziegler et al. 2019, eq. 2):
//   r_t      = -kl_coef * (logprobs_t - ref_logprobs_t)                    t < L
//   r_{L-1} += clip(scores[b], -reward_clip, reward_clip) + truncation_penalty * truncated[b]
// logprobs, ref_logprobs: (B, T) float32; scores: (B,) float32; lengths: (B,) int64;
// kl_coef >= 0; truncated: (B,) bool, or null (no response was truncated);
// reward_clip: > 0, or nullopt (no clipping).  Returns (B, T) float32.
Owned<float> per_token_rewards(const Array& logprobs, const Array& ref_logprobs, const Array& scores,
                               const Array& lengths, double kl_coef, const Array* truncated,
                               double truncation_penalty, std::optional<double> reward_clip);

// Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16), per sequence:
//   delta_t = r_t + gamma * V_{t+1} - V_t,   V_L = 0 (the episode ends)
//   A_t     = delta_t + gamma * lam * A_{t+1}
//   returns_t = A_t + V_t
// rewards, values: (B, T) float32; gamma, lam in [0, 1].  Returns (advantages,
// returns), each (B, T) float32.  gamma and gamma * lam round to float as torch
// rounds a Python scalar times a float32 tensor, and the float operations are
// torch's loop's, in its order: the results equal it bit for bit.
std::pair<Owned<float>, Owned<float>> gae(const Array& rewards, const Array& values, const Array& lengths,
                                          double gamma, double lam);

// Advantage whitening over the valid tokens: (x - mean) / sqrt(var + 1e-8), plus
// mean again unless shift_mean.  x: (B, T) float32.  Without mean and var, they are
// the batch's own (var unbiased; needs >= 2 valid tokens; accumulated in double).
// With them (both or neither: finite, var >= 0) they are used as given, e.g. the
// statistics of the whole batch across ranks (see masked_moments).  (B, T) float32.
Owned<float> whiten(const Array& x, const Array& lengths, bool shift_mean, std::optional<double> mean,
                    std::optional<double> var);

// Over the valid tokens of x ((B, T) float32), with d = x - shift in double:
// the count, sum(d) and sum(d^2), summed in row order (the same on every run).
// Two calls give exact statistics of a batch split over ranks: shift 0 for the
// global mean (sums all-reduced), then shift = that mean for the variance.
struct Moments {
    int64_t count = 0;
    double sum = 0.0;
    double sum_squares = 0.0;
};
Moments masked_moments(const Array& x, const Array& lengths, double shift);

// The order of one PPO epoch: a uniform permutation of 0..n-1 (Fisher-Yates
// driven by splitmix64, so a seed gives the same order on every platform),
// whose consecutive runs of minibatch_size are the minibatches (the last one
// shorter when minibatch_size does not divide n).  n, minibatch_size >= 1;
// seed >= 0.  Returns (n,) int64.
Owned<int64_t> minibatch_order(int64_t n, int64_t minibatch_size, int64_t seed);

// Threads used by every loop above (default: the CPUs this process may run
// on, capped by OMP_NUM_THREADS when set).  Small batches run on one thread.
void set_num_threads(int n);
int num_threads();

}  // namespace minirlhf
