// PPO bookkeeping between generation and the update, as a plain C++17 library.
//
// Every per-token array is a right-padded, row-major (B, T) float32 buffer:
// response token t of sequence b lives at [b * T + t] for t < lengths[b], and
// whatever sits at t >= lengths[b] is never read.  Outputs are fully written,
// padding included (zeros), so a caller can hand in uninitialised memory.
//
// Each function checks its values (lengths, gamma, lambda, finiteness) and
// throws std::invalid_argument with a message naming the argument and the
// offending row; shapes and dtypes are the caller's job (see bindings.cpp).
// Finiteness of the float inputs is checked in the same pass as the compute,
// so on a throw the outputs hold partial results.
//
// Work is split over sequences on std::threads (see set_num_threads); results
// do not depend on the number of threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace minirlhf {

// The shape every (B, T) array of one rollout batch shares.
struct Batch {
    int64_t size = 0;                  // B, number of sequences
    int64_t max_len = 0;               // T, padded width of every (B, T) array
    const int64_t* lengths = nullptr;  // (B,) response lengths, 1 <= lengths[b] <= T
};

// Throws unless B >= 1, T >= 1 and every 1 <= lengths[b] <= T.
void check_batch(const Batch& batch);

// Per-token rewards (InstructGPT / Ziegler et al. 2019):
//   r_t = -kl_coef * (old_logprobs_t - ref_logprobs_t)                  for t < L
//   r_{L-1} += clip(score, -reward_clip, reward_clip)
//              + (hit_max[b] ? no_eos_penalty : 0)
// reward_clip <= 0 means no clipping; hit_max may be null (no sequence hit the
// length limit).  no_eos_penalty is added, so it must be <= 0.
struct RewardParams {
    double kl_coef = 0.0;         // beta >= 0
    double no_eos_penalty = 0.0;  // <= 0, added to the score of truncated responses
    double reward_clip = 0.0;     // > 0 clips the score to [-clip, clip]; 0 = off
};
void assemble_rewards(const Batch& batch, const float* old_logprobs, const float* ref_logprobs,
                      const float* scores, const uint8_t* hit_max, const RewardParams& params,
                      float* rewards);

// Generalised advantage estimation (Schulman et al. 2016), per sequence:
//   delta_t = r_t + gamma * V_{t+1} - V_t,   V_L = 0 (the episode ends)
//   A_t     = delta_t + gamma * lambda * A_{t+1}
//   R_t     = A_t + V_t
// gamma, lambda in [0, 1].  Outputs may alias inputs exactly (e.g. advantages
// written over rewards), never partially.
// gamma and lam arrive as double and round to float the way torch rounds a
// Python scalar, so the results match a float32 torch loop bit for bit.
void gae(const Batch& batch, const float* rewards, const float* values, double gamma, double lam,
         float* advantages, float* returns);

// Mean and unbiased variance of x over the valid tokens of every sequence.
// Needs at least two valid tokens in all.  Accumulated in double.
struct Moments {
    int64_t count = 0;
    double mean = 0.0;
    double var = 0.0;  // unbiased: sum((x - mean)^2) / (count - 1)
};
Moments masked_moments(const Batch& batch, const float* x, const char* name);

// Whitening over valid tokens: (x - mean) / sqrt(var + 1e-8), plus mean again
// when keep_mean (shift_mean=false in TRL's terms); padding set to 0.
// out may alias x.
void whiten(const Batch& batch, const float* x, bool keep_mean, float* out);

// A seeded uniform permutation of 0..n-1: Fisher-Yates driven by splitmix64,
// so the same seed gives the same order on every platform.
std::vector<int64_t> permutation(int64_t n, uint64_t seed);

// out[i] = first `row_bytes` bytes of row idx[i] of src (rows `src_row_stride`
// bytes apart).  Every idx[i] must be in [0, n_src_rows).
void gather_rows(const void* src, int64_t n_src_rows, int64_t src_row_stride, const int64_t* idx,
                 int64_t n_idx, int64_t row_bytes, void* out);

// First-fit-decreasing packing of sequences into rows of `budget` tokens:
// sequences in decreasing length (ties by index) each go to the first row with
// room; row_of_seq[b] and offset_of_seq[b] say where sequence b starts.
struct Packing {
    int64_t n_rows = 0;
    std::vector<int64_t> row_of_seq;     // (B,)
    std::vector<int64_t> offset_of_seq;  // (B,)
};
Packing pack(const int64_t* lengths, int64_t n, int64_t budget);

// For a packing: position_ids[r, j] = position of token j of row r inside its
// own sequence (0 on padding) and segment_ids[r, j] = index b of that sequence
// (-1 on padding), both (n_rows, budget) int64.
void packing_ids(const int64_t* lengths, int64_t n, int64_t budget, const Packing& packing,
                 int64_t* position_ids, int64_t* segment_ids);

// Moves whole sequences between the padded (B, T, ...) layout and the packed
// (n_rows, budget, ...) layout; `token_bytes` is the size of one token's entry.
// Packed padding and padded tails are zero-filled.
void pack_rows(const void* padded, const int64_t* lengths, int64_t n, int64_t max_len,
               int64_t token_bytes, const Packing& packing, int64_t budget, void* packed);
void unpack_rows(const void* packed, const int64_t* lengths, int64_t n, int64_t max_len,
                 int64_t token_bytes, const Packing& packing, int64_t budget, void* padded);

// Threads used by every loop above (default: the CPUs this process may run
// on, capped by OMP_NUM_THREADS when set).  Small batches run on one thread.
void set_num_threads(int n);
int num_threads();

}  // namespace minirlhf
