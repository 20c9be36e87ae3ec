// See rollout_buffer.h for the conventions.  Each operation is a loop over
// sequences (rows); a row is validated just before it is computed, while it
// is hot in cache, and the first bad row stops the work and is reported.
#include "rollout_buffer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>

#ifdef __linux__
#include <sched.h>
#endif

namespace minirlhf {
namespace {

// ---------------------------------------------------------------- messages

template <typename... Parts>
std::string str(const Parts&... parts) {
    std::ostringstream out;
    (out << ... << parts);
    return out.str();
}

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

// ---------------------------------------------------------------- threads

std::atomic<int> g_num_threads{0};  // 0: not chosen yet

int default_num_threads() {
    int n = static_cast<int>(std::thread::hardware_concurrency());
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
    if (const char* omp = std::getenv("OMP_NUM_THREADS")) {
        const int cap = std::atoi(omp);
        if (cap > 0) n = std::min(n, cap);
    }
    return std::max(n, 1);
}

// Below this many array elements, starting threads costs more than it saves.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 15;

// The first failure in a range of rows: the row and its message.
struct RowError {
    int64_t row = -1;
    std::string message;
    explicit operator bool() const { return row >= 0; }
};

// Runs body(begin, end) over contiguous chunks of [0, n) rows, one chunk per
// thread, the calling thread taking the first.  body returns the first failing
// row of its chunk (and stops there); the failure with the lowest row, which is
// the first in row order, is thrown once every thread has joined.
void parallel_rows(int64_t n, int64_t elements,
                   const std::function<RowError(int64_t, int64_t)>& body) {
    int64_t threads = std::min<int64_t>(num_threads(), n);
    threads = std::min<int64_t>(threads, std::max<int64_t>(1, elements / kMinElementsPerThread));
    std::vector<RowError> errors(static_cast<size_t>(std::max<int64_t>(threads, 1)));
    if (threads <= 1) {
        errors[0] = body(0, n);
    } else {
        std::vector<std::thread> pool;
        pool.reserve(static_cast<size_t>(threads - 1));
        auto chunk = [&](int64_t i) { return std::make_pair(n * i / threads, n * (i + 1) / threads); };
        for (int64_t i = 1; i < threads; ++i) {
            const auto [begin, end] = chunk(i);
            try {
                pool.emplace_back([&errors, &body, i, begin = begin, end = end] {
                    errors[static_cast<size_t>(i)] = body(begin, end);
                });
            } catch (const std::system_error&) {  // no thread to be had: do it here
                errors[static_cast<size_t>(i)] = body(begin, end);
            }
        }
        const auto [begin, end] = chunk(0);
        errors[0] = body(begin, end);
        for (auto& t : pool) t.join();
    }
    for (auto& e : errors)
        if (e) fail(e.message);
}

// ---------------------------------------------------------------- checks

bool all_finite(const float* x, int64_t n) {
    // On the bits, so that it vectorises: an all-ones exponent (inf, NaN)
    // carries into bit 31 when one is added to it.  The slow search for the
    // culprit runs only on failure.
    uint32_t acc = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        std::memcpy(&bits, x + i, sizeof bits);
        acc |= (bits & 0x7f800000u) + 0x00800000u;
    }
    return (acc & 0x80000000u) == 0;
}

RowError first_non_finite(const char* name, const float* row, int64_t b, int64_t len) {
    for (int64_t t = 0; t < len; ++t)
        if (!std::isfinite(row[t]))
            return {b, str(name, "[", b, ", ", t, "]=", row[t], " is not finite")};
    return {};
}

void check_unit_interval(const char* name, double x) {
    if (!(x >= 0.0 && x <= 1.0)) fail(str(name, "=", x, " is outside [0, 1]"));
}

void zero_tail(float* row, int64_t len, int64_t max_len) {
    std::memset(row + len, 0, static_cast<size_t>(max_len - len) * sizeof(float));
}

// Mean and sum of squared deviations of one row: two passes over a row that
// is in cache, each with eight accumulators so the adds do not wait on one
// another (a fixed order, so the result is the same on every run).
struct RowMoments {
    int64_t count;
    double mean;
    double m2;
};

RowMoments row_moments(const float* x, int64_t len) {
    constexpr int kLanes = 8;
    double acc[kLanes] = {};
    int64_t t = 0;
    for (; t + kLanes <= len; t += kLanes)
        for (int k = 0; k < kLanes; ++k) acc[k] += x[t + k];
    double sum = 0.0;
    for (; t < len; ++t) sum += x[t];
    for (double a : acc) sum += a;
    const double mean = sum / static_cast<double>(len);

    double sq[kLanes] = {};
    for (t = 0; t + kLanes <= len; t += kLanes)
        for (int k = 0; k < kLanes; ++k) {
            const double d = x[t + k] - mean;
            sq[k] += d * d;
        }
    double m2 = 0.0;
    for (; t < len; ++t) m2 += (x[t] - mean) * (x[t] - mean);
    for (double a : sq) m2 += a;
    return {len, mean, m2};
}

}  // namespace

// ---------------------------------------------------------------- threads API

void set_num_threads(int n) {
    if (n < 1) fail(str("num_threads=", n, " must be >= 1"));
    g_num_threads = n;
}

int num_threads() {
    int n = g_num_threads.load();
    if (n == 0) {
        n = default_num_threads();
        g_num_threads = n;
    }
    return n;
}

// ---------------------------------------------------------------- batch

void check_batch(const Batch& batch) {
    if (batch.size < 1) fail(str("empty batch: B=", batch.size, " sequences"));
    if (batch.max_len < 1) fail(str("empty batch: T=", batch.max_len, " tokens per row"));
    for (int64_t b = 0; b < batch.size; ++b) {
        const int64_t len = batch.lengths[b];
        if (len < 1) fail(str("lengths[", b, "]=", len, " must be >= 1"));
        if (len > batch.max_len) fail(str("lengths[", b, "]=", len, " exceeds T=", batch.max_len));
    }
}

// ---------------------------------------------------------------- rewards

void assemble_rewards(const Batch& batch, const float* old_logprobs, const float* ref_logprobs,
                      const float* scores, const uint8_t* hit_max, const RewardParams& params,
                      float* rewards) {
    check_batch(batch);
    if (!(params.kl_coef >= 0.0 && std::isfinite(params.kl_coef)))
        fail(str("kl_coef=", params.kl_coef, " must be finite and >= 0"));
    if (!(params.no_eos_penalty <= 0.0 && std::isfinite(params.no_eos_penalty)))
        fail(str("no_eos_penalty=", params.no_eos_penalty,
                 " must be finite and <= 0 (it is added to the score)"));
    if (!(params.reward_clip >= 0.0 && std::isfinite(params.reward_clip)))
        fail(str("reward_clip=", params.reward_clip, " must be finite and > 0 (0 turns it off)"));

    const int64_t T = batch.max_len;
    const float neg_kl_coef = static_cast<float>(-params.kl_coef);
    const float clip = static_cast<float>(params.reward_clip);
    const float penalty = static_cast<float>(params.no_eos_penalty);

    parallel_rows(batch.size, batch.size * T, [&](int64_t begin, int64_t end) -> RowError {
        for (int64_t b = begin; b < end; ++b) {
            const int64_t len = batch.lengths[b];
            const float* old_row = old_logprobs + b * T;
            const float* ref_row = ref_logprobs + b * T;
            if (!all_finite(old_row, len)) return first_non_finite("old_logprobs", old_row, b, len);
            if (!all_finite(ref_row, len)) return first_non_finite("ref_logprobs", ref_row, b, len);
            if (!std::isfinite(scores[b]))
                return {b, str("scores[", b, "]=", scores[b], " is not finite")};

            float* out = rewards + b * T;
            for (int64_t t = 0; t < len; ++t) out[t] = neg_kl_coef * (old_row[t] - ref_row[t]);
            float score = scores[b];
            if (clip > 0.0f) score = std::min(std::max(score, -clip), clip);
            if (hit_max != nullptr && hit_max[b]) score = score + penalty;
            out[len - 1] = out[len - 1] + score;
            zero_tail(out, len, T);
            if (!all_finite(out, len))
                return {b, str("rewards overflow float32 in row ", b, " (kl_coef * |old - ref| too large)")};
        }
        return {};
    });
}

// ---------------------------------------------------------------- GAE

namespace {

// Backwards through one sequence, from token `t` down to 0, carrying
// V_{t+1} (next_value) and A_{t+1} (last_gae).  v[t] is read before adv[t]
// and ret[t] are written, and V_{t+1} is carried rather than re-read, so the
// outputs may alias the inputs.  The float operations are those of the usual
// torch loop, in its order.
struct GaeRow {
    int64_t offset;  // of the row's token 0 in every (B, T) array
    int64_t t;       // next token to compute; -1 when done
    float next_value = 0.0f;
    float last_gae = 0.0f;
};

void gae_finish(GaeRow& row, const float* r, const float* v, float* adv, float* ret, float g, float gl) {
    const int64_t o = row.offset;
    for (int64_t t = row.t; t >= 0; --t) {
        const float value = v[o + t];
        const float delta = r[o + t] + g * row.next_value - value;
        row.last_gae = delta + gl * row.last_gae;
        adv[o + t] = row.last_gae;
        ret[o + t] = row.last_gae + value;
        row.next_value = value;
    }
    row.t = -1;
}

// The same for K sequences at once, `steps` tokens each.  One sequence is a
// chain of dependent multiply-adds (~8 cycles a token); K independent chains
// interleaved keep the CPU busy instead.  Per sequence the arithmetic is
// unchanged, so the results are identical to gae_finish's.
template <int K>
void gae_interleaved(GaeRow* rows, int64_t steps, const float* r, const float* v, float* adv, float* ret,
                     float g, float gl) {
    int64_t at[K];  // index of each row's current token; all step back together
    float next_value[K], last_gae[K];
    for (int k = 0; k < K; ++k) {
        at[k] = rows[k].offset + rows[k].t;
        next_value[k] = rows[k].next_value;
        last_gae[k] = rows[k].last_gae;
    }
    for (int64_t i = 0; i < steps; ++i) {
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) {
            const int64_t j = at[k] - i;
            const float value = v[j];
            const float delta = r[j] + g * next_value[k] - value;
            last_gae[k] = delta + gl * last_gae[k];
            adv[j] = last_gae[k];
            ret[j] = last_gae[k] + value;
            next_value[k] = value;
        }
    }
    for (int k = 0; k < K; ++k) {
        rows[k].t -= steps;
        rows[k].next_value = next_value[k];
        rows[k].last_gae = last_gae[k];
    }
}

constexpr int kGaeLanes = 2;  // more would map to one L1 set when T is a power of 2

}  // namespace

void gae(const Batch& batch, const float* rewards, const float* values, double gamma, double lam,
         float* advantages, float* returns) {
    check_batch(batch);
    check_unit_interval("gamma", gamma);
    check_unit_interval("lam", lam);

    const int64_t T = batch.max_len;
    const int64_t* lengths = batch.lengths;
    // Rounded as torch rounds `gamma * x` and `gamma * lam * x` for a float32 x.
    const float g = static_cast<float>(gamma);
    const float gl = static_cast<float>(gamma * lam);

    auto check_row = [&](int64_t b) -> RowError {
        const float* r = rewards + b * T;
        const float* v = values + b * T;
        if (!all_finite(r, lengths[b])) return first_non_finite("rewards", r, b, lengths[b]);
        if (!all_finite(v, lengths[b])) return first_non_finite("values", v, b, lengths[b]);
        return {};
    };
    // A NaN or inf among a row's rewards or values makes its returns
    // non-finite too, so checking the returns (hot in cache) checks the
    // inputs.  When an output overwrites an input, though, the input must be
    // checked before it is gone.
    const bool in_place = advantages == rewards || advantages == values || returns == rewards ||
                          returns == values;

    parallel_rows(batch.size, batch.size * T, [&](int64_t begin, int64_t end) -> RowError {
        // The first bad row of the chunk in row order, whatever the work order.
        auto first_bad = [&](int64_t overflow_row) -> RowError {
            for (int64_t b = begin; b < end; ++b)
                if (RowError e = check_row(b)) return e;
            return {overflow_row, str("advantages or returns overflow float32 in row ", overflow_row)};
        };
        // Longest first, in groups of kGaeLanes of similar length: a group runs
        // interleaved for as long as its shortest member, the rest one by one.
        std::vector<int64_t> order(static_cast<size_t>(end - begin));
        std::iota(order.begin(), order.end(), begin);
        std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
            return lengths[a] != lengths[b] ? lengths[a] > lengths[b] : a < b;
        });
        for (size_t first = 0; first < order.size(); first += kGaeLanes) {
            const size_t n = std::min(order.size() - first, static_cast<size_t>(kGaeLanes));
            GaeRow rows[kGaeLanes];
            for (size_t k = 0; k < n; ++k) {
                const int64_t b = order[first + k];
                if (in_place && check_row(b)) return first_bad(b);
                rows[k] = GaeRow{b * T, lengths[b] - 1};
            }
            if (n == kGaeLanes)
                gae_interleaved<kGaeLanes>(rows, lengths[order[first + n - 1]], rewards, values, advantages,
                                           returns, g, gl);
            for (size_t k = 0; k < n; ++k) {
                const int64_t b = order[first + k];
                gae_finish(rows[k], rewards, values, advantages, returns, g, gl);
                if (!all_finite(returns + b * T, lengths[b])) return first_bad(b);
                zero_tail(advantages + b * T, lengths[b], T);
                zero_tail(returns + b * T, lengths[b], T);
            }
        }
        return {};
    });
}

// ---------------------------------------------------------------- whitening

Moments masked_moments(const Batch& batch, const float* x, const char* name) {
    check_batch(batch);
    const int64_t T = batch.max_len;
    std::vector<RowMoments> rows(static_cast<size_t>(batch.size));
    parallel_rows(batch.size, batch.size * T, [&](int64_t begin, int64_t end) -> RowError {
        for (int64_t b = begin; b < end; ++b) {
            const int64_t len = batch.lengths[b];
            const float* row = x + b * T;
            rows[static_cast<size_t>(b)] = row_moments(row, len);
            // A double sum of floats cannot overflow, so non-finite means a non-finite input.
            if (!std::isfinite(rows[static_cast<size_t>(b)].mean)) return first_non_finite(name, row, b, len);
        }
        return {};
    });

    // Chan et al.'s pairwise update, in row order so the result is reproducible.
    int64_t n = 0;
    double mean = 0.0, m2 = 0.0;
    for (const RowMoments& r : rows) {
        const int64_t total = n + r.count;
        const double delta = r.mean - mean;
        mean += delta * static_cast<double>(r.count) / static_cast<double>(total);
        m2 += r.m2 + delta * delta * static_cast<double>(n) * static_cast<double>(r.count) /
                         static_cast<double>(total);
        n = total;
    }
    if (n < 2) fail(str(name, ": whitening needs at least 2 valid tokens, got ", n));
    return {n, mean, m2 / static_cast<double>(n - 1)};
}

void whiten(const Batch& batch, const float* x, bool keep_mean, float* out) {
    const Moments m = masked_moments(batch, x, "x");
    const int64_t T = batch.max_len;
    // The mean as a float plus the float of what that drops: x - mean_hi is
    // exact for x near the mean (Sterbenz), so a large mean over a small
    // spread keeps its digits without double arithmetic per token.
    const float mean_hi = static_cast<float>(m.mean);
    const float mean_lo = static_cast<float>(m.mean - static_cast<double>(mean_hi));
    const float inv_std = static_cast<float>(1.0 / std::sqrt(m.var + 1e-8));
    const float shift = keep_mean ? mean_hi : 0.0f;
    parallel_rows(batch.size, batch.size * T, [&](int64_t begin, int64_t end) -> RowError {
        for (int64_t b = begin; b < end; ++b) {
            const int64_t len = batch.lengths[b];
            const float* in = x + b * T;
            float* o = out + b * T;
            for (int64_t t = 0; t < len; ++t) o[t] = ((in[t] - mean_hi) - mean_lo) * inv_std + shift;
            zero_tail(o, len, T);
        }
        return {};
    });
}

// ---------------------------------------------------------------- minibatches

namespace {

// splitmix64 (Steele, Lea & Flood 2014): tiny, fast, and statistically fine
// for shuffling.  Spelled out so a test can reproduce it in Python.
struct SplitMix64 {
    uint64_t state;
    uint64_t next() {
        uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
    // Uniform in [0, range) without modulo bias: reject the 2^64 mod range lowest draws.
    uint64_t below(uint64_t range) {
        const uint64_t threshold = (0 - range) % range;
        for (;;) {
            const uint64_t r = next();
            if (r >= threshold) return r % range;
        }
    }
};

}  // namespace

std::vector<int64_t> permutation(int64_t n, uint64_t seed) {
    if (n < 1) fail(str("n=", n, " must be >= 1"));
    std::vector<int64_t> perm(static_cast<size_t>(n));
    std::iota(perm.begin(), perm.end(), int64_t{0});
    SplitMix64 rng{seed};
    for (int64_t i = n - 1; i > 0; --i) {
        const auto j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
        std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(j)]);
    }
    return perm;
}

void gather_rows(const void* src, int64_t n_src_rows, int64_t src_row_stride, const int64_t* idx,
                 int64_t n_idx, int64_t row_bytes, void* out) {
    if (n_idx < 1) fail(str("idx is empty"));
    if (row_bytes < 0 || row_bytes > src_row_stride)
        fail(str("row_bytes=", row_bytes, " is outside [0, ", src_row_stride, "]"));
    for (int64_t i = 0; i < n_idx; ++i)
        if (idx[i] < 0 || idx[i] >= n_src_rows)
            fail(str("idx[", i, "]=", idx[i], " is outside [0, ", n_src_rows, ")"));
    const auto* from = static_cast<const char*>(src);
    auto* to = static_cast<char*>(out);
    parallel_rows(n_idx, n_idx * row_bytes / 4, [&](int64_t begin, int64_t end) -> RowError {
        for (int64_t i = begin; i < end; ++i)
            std::memcpy(to + i * row_bytes, from + idx[i] * src_row_stride, static_cast<size_t>(row_bytes));
        return {};
    });
}

// ---------------------------------------------------------------- packing

Packing pack(const int64_t* lengths, int64_t n, int64_t budget) {
    if (n < 1) fail(str("empty batch: ", n, " sequences"));
    if (budget < 1) fail(str("budget=", budget, " must be >= 1"));
    for (int64_t b = 0; b < n; ++b) {
        if (lengths[b] < 1) fail(str("lengths[", b, "]=", lengths[b], " must be >= 1"));
        if (lengths[b] > budget)
            fail(str("lengths[", b, "]=", lengths[b], " exceeds budget=", budget));
    }
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });

    // First fit in O(log n) per sequence: a max-tree over the free space of n
    // candidate rows (there are never more rows than sequences).  Unopened rows
    // are empty, and opened rows are always a prefix, so "the leftmost row with
    // room" is either an open row or the next new one.
    int64_t leaves = 1;
    while (leaves < n) leaves *= 2;
    std::vector<int64_t> room(static_cast<size_t>(2 * leaves), 0);
    for (int64_t i = 0; i < n; ++i) room[static_cast<size_t>(leaves + i)] = budget;
    for (int64_t i = leaves - 1; i >= 1; --i)
        room[static_cast<size_t>(i)] = std::max(room[static_cast<size_t>(2 * i)], room[static_cast<size_t>(2 * i + 1)]);

    Packing p;
    p.row_of_seq.assign(static_cast<size_t>(n), 0);
    p.offset_of_seq.assign(static_cast<size_t>(n), 0);
    for (int64_t b : order) {
        const int64_t len = lengths[b];
        int64_t node = 1;  // room[1] >= len always: some candidate row is still empty
        while (node < leaves) node = room[static_cast<size_t>(2 * node)] >= len ? 2 * node : 2 * node + 1;
        const int64_t row = node - leaves;
        p.row_of_seq[static_cast<size_t>(b)] = row;
        p.offset_of_seq[static_cast<size_t>(b)] = budget - room[static_cast<size_t>(node)];
        p.n_rows = std::max(p.n_rows, row + 1);
        room[static_cast<size_t>(node)] -= len;
        for (node /= 2; node >= 1; node /= 2)
            room[static_cast<size_t>(node)] =
                std::max(room[static_cast<size_t>(2 * node)], room[static_cast<size_t>(2 * node + 1)]);
    }
    return p;
}

namespace {

// A packing that came back from the caller must place every sequence inside
// its row, without overlap, before anything is copied.
void check_packing(const int64_t* lengths, int64_t n, int64_t budget, const Packing& p) {
    if (n < 1) fail(str("empty batch: ", n, " sequences"));
    if (budget < 1) fail(str("budget=", budget, " must be >= 1"));
    if (p.n_rows < 1) fail(str("packing has n_rows=", p.n_rows));
    if (static_cast<int64_t>(p.row_of_seq.size()) != n || static_cast<int64_t>(p.offset_of_seq.size()) != n)
        fail(str("packing is for ", p.row_of_seq.size(), " sequences, lengths has ", n));
    std::vector<uint8_t> used(static_cast<size_t>(p.n_rows * budget), 0);
    for (int64_t b = 0; b < n; ++b) {
        const int64_t len = lengths[b], row = p.row_of_seq[static_cast<size_t>(b)],
                      off = p.offset_of_seq[static_cast<size_t>(b)];
        if (len < 1) fail(str("lengths[", b, "]=", len, " must be >= 1"));
        if (row < 0 || row >= p.n_rows)
            fail(str("row_of_seq[", b, "]=", row, " is outside [0, ", p.n_rows, ")"));
        if (off < 0 || off > budget - len)
            fail(str("offset_of_seq[", b, "]=", off, " with lengths[", b, "]=", len,
                     " does not fit budget=", budget));
        uint8_t* cell = used.data() + row * budget + off;
        for (int64_t j = 0; j < len; ++j) {
            if (cell[j]) fail(str("sequence ", b, " overlaps another one in row ", row));
            cell[j] = 1;
        }
    }
}

}  // namespace

void packing_ids(const int64_t* lengths, int64_t n, int64_t budget, const Packing& packing,
                 int64_t* position_ids, int64_t* segment_ids) {
    check_packing(lengths, n, budget, packing);
    const int64_t cells = packing.n_rows * budget;
    std::fill(position_ids, position_ids + cells, int64_t{0});
    std::fill(segment_ids, segment_ids + cells, int64_t{-1});
    parallel_rows(n, cells, [&](int64_t begin, int64_t end) -> RowError {
        for (int64_t b = begin; b < end; ++b) {
            const int64_t at = packing.row_of_seq[static_cast<size_t>(b)] * budget +
                               packing.offset_of_seq[static_cast<size_t>(b)];
            for (int64_t j = 0; j < lengths[b]; ++j) {
                position_ids[at + j] = j;
                segment_ids[at + j] = b;
            }
        }
        return {};
    });
}

void pack_rows(const void* padded, const int64_t* lengths, int64_t n, int64_t max_len,
               int64_t token_bytes, const Packing& packing, int64_t budget, void* packed) {
    check_batch({n, max_len, lengths});
    check_packing(lengths, n, budget, packing);
    const auto* from = static_cast<const char*>(padded);
    auto* to = static_cast<char*>(packed);
    std::memset(to, 0, static_cast<size_t>(packing.n_rows * budget * token_bytes));
    parallel_rows(n, n * max_len * token_bytes / 4, [&](int64_t begin, int64_t end) -> RowError {
        for (int64_t b = begin; b < end; ++b) {
            const int64_t at = packing.row_of_seq[static_cast<size_t>(b)] * budget +
                               packing.offset_of_seq[static_cast<size_t>(b)];
            std::memcpy(to + at * token_bytes, from + b * max_len * token_bytes,
                        static_cast<size_t>(lengths[b] * token_bytes));
        }
        return {};
    });
}

void unpack_rows(const void* packed, const int64_t* lengths, int64_t n, int64_t max_len,
                 int64_t token_bytes, const Packing& packing, int64_t budget, void* padded) {
    check_batch({n, max_len, lengths});
    check_packing(lengths, n, budget, packing);
    const auto* from = static_cast<const char*>(packed);
    auto* to = static_cast<char*>(padded);
    parallel_rows(n, n * max_len * token_bytes / 4, [&](int64_t begin, int64_t end) -> RowError {
        for (int64_t b = begin; b < end; ++b) {
            const int64_t at = packing.row_of_seq[static_cast<size_t>(b)] * budget +
                               packing.offset_of_seq[static_cast<size_t>(b)];
            char* row = to + b * max_len * token_bytes;
            const int64_t copied = lengths[b] * token_bytes;
            std::memcpy(row, from + at * token_bytes, static_cast<size_t>(copied));
            std::memset(row + copied, 0, static_cast<size_t>(max_len * token_bytes - copied));
        }
        return {};
    });
}

}  // namespace minirlhf
