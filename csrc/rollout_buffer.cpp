// See rollout_buffer.h for the conventions.  Each operation checks its
// arguments' dtype, shape and layout, its lengths and scalars, then loops over
// sequences (rows), checking a row's numbers just before it is computed, while
// it is hot in cache; the first bad row stops the work and is reported.
#include "rollout_buffer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
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

std::string shape_str(const std::vector<int64_t>& shape) {
    std::ostringstream out;
    out << "(";
    for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
    out << (shape.size() == 1 ? ",)" : ")");
    return out.str();
}

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
void parallel_rows(int64_t n, int64_t elements, const std::function<RowError(int64_t, int64_t)>& body) {
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

// ---------------------------------------------------------------- arguments

const char* dtype_name(DType d) {
    switch (d) {
        case DType::float32: return "float32";
        case DType::int64: return "int64";
        case DType::boolean: return "bool";
        default: return "another dtype";
    }
}

// a's data, after checking it is an array of `dtype` and `shape` (-1: any extent)
// in the standard layout.
const void* checked(const Array& a, const char* name, DType dtype, const std::vector<int64_t>& shape) {
    if (!a.is_array)
        fail(str(name, " must be an array of ", dtype_name(dtype), " (a CPU torch tensor or numpy array), got ", a.what));
    if (a.dtype != dtype)
        fail(str(name, " must have dtype ", dtype_name(dtype), ", got ", a.dtype == DType::other ? a.what : dtype_name(a.dtype)));
    if (a.shape.size() != shape.size())
        fail(str(name, " must have ", shape.size(), shape.size() == 1 ? " dimension" : " dimensions", ", got shape ",
                 shape_str(a.shape)));
    for (size_t i = 0; i < shape.size(); ++i)
        if (shape[i] >= 0 && a.shape[i] != shape[i])
            fail(str(name, " has shape ", shape_str(a.shape), ", expected ", shape_str(shape)));
    if (!a.standard_layout) fail(str(name, " must be C-contiguous, aligned and in native byte order"));
    return a.data;
}

const float* floats(const Array& a, const char* name, const std::vector<int64_t>& shape) {
    return static_cast<const float*>(checked(a, name, DType::float32, shape));
}

// The shape every (B, T) array of one call shares.
struct Batch {
    int64_t size = 0;                  // B, number of sequences
    int64_t max_len = 0;               // T, padded width of every (B, T) array
    const int64_t* lengths = nullptr;  // (B,) response lengths, 1 <= lengths[b] <= T
    std::vector<int64_t> shape() const { return {size, max_len}; }
};

// B from lengths, T from `first` (a (B, T) float32 array); every length checked.
Batch batch_of(const Array& first, const char* name, const Array& lengths) {
    Batch batch;
    batch.lengths = static_cast<const int64_t*>(checked(lengths, "lengths", DType::int64, {-1}));
    floats(first, name, {-1, -1});
    batch.size = lengths.shape[0];
    batch.max_len = first.shape[1];
    if (batch.size < 1) fail(str("empty batch: B=", batch.size, " sequences"));
    if (batch.max_len < 1) fail(str("empty batch: T=", batch.max_len, " tokens per row"));
    floats(first, name, batch.shape());
    for (int64_t b = 0; b < batch.size; ++b) {
        const int64_t len = batch.lengths[b];
        if (len < 1) fail(str("lengths[", b, "]=", len, " must be >= 1"));
        if (len > batch.max_len) fail(str("lengths[", b, "]=", len, " exceeds T=", batch.max_len));
    }
    return batch;
}

void check_unit_interval(const char* name, double x) {
    if (!(x >= 0.0 && x <= 1.0)) fail(str(name, "=", x, " is outside [0, 1]"));
}

template <typename T>
Owned<T> owned(std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return {std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]), std::move(shape)};  // uninitialised
}

// ---------------------------------------------------------------- rows

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
        if (!std::isfinite(row[t])) return {b, str(name, "[", b, ", ", t, "]=", row[t], " is not finite")};
    return {};
}

void zero_tail(float* row, int64_t len, int64_t max_len) {
    std::memset(row + len, 0, static_cast<size_t>(max_len - len) * sizeof(float));
}

// sum(d) and (when Squares) sum(d^2) of d = x - shift over one row, in double,
// with eight accumulators each so the adds do not wait on one another (a fixed
// order, so the result is the same on every run).
template <bool Squares>
std::pair<double, double> row_sums(const float* x, int64_t len, double shift) {
    constexpr int kLanes = 8;
    double s[kLanes] = {}, q[kLanes] = {};
    int64_t t = 0;
    for (; t + kLanes <= len; t += kLanes)
        for (int k = 0; k < kLanes; ++k) {
            const double d = x[t + k] - shift;
            s[k] += d;
            if constexpr (Squares) q[k] += d * d;
        }
    double sum = 0.0, squares = 0.0;
    for (; t < len; ++t) {
        const double d = x[t] - shift;
        sum += d;
        if constexpr (Squares) squares += d * d;
    }
    for (int k = 0; k < kLanes; ++k) {
        sum += s[k];
        squares += q[k];
    }
    return {sum, squares};
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

// ---------------------------------------------------------------- rewards

Owned<float> per_token_rewards(const Array& logprobs, const Array& ref_logprobs, const Array& scores,
                               const Array& lengths, double kl_coef, const Array* truncated,
                               double truncation_penalty, std::optional<double> reward_clip) {
    const Batch batch = batch_of(logprobs, "logprobs", lengths);
    const float* lp = floats(logprobs, "logprobs", batch.shape());
    const float* ref = floats(ref_logprobs, "ref_logprobs", batch.shape());
    const float* sc = floats(scores, "scores", {batch.size});
    const auto* cut = truncated == nullptr
                          ? nullptr
                          : static_cast<const uint8_t*>(checked(*truncated, "truncated", DType::boolean, {batch.size}));
    if (!(kl_coef >= 0.0 && std::isfinite(kl_coef))) fail(str("kl_coef=", kl_coef, " must be finite and >= 0"));
    if (!std::isfinite(truncation_penalty)) fail(str("truncation_penalty=", truncation_penalty, " must be finite"));
    if (reward_clip && !(*reward_clip > 0.0 && std::isfinite(*reward_clip)))
        fail(str("reward_clip=", *reward_clip, " must be finite and > 0 (None turns clipping off)"));

    const int64_t T = batch.max_len;
    const float neg_kl_coef = static_cast<float>(-kl_coef);
    const float penalty = static_cast<float>(truncation_penalty);
    Owned<float> rewards = owned<float>(batch.shape());
    float* const out = rewards.data.get();
    parallel_rows(batch.size, batch.size * T, [&](int64_t begin, int64_t end) -> RowError {
        for (int64_t b = begin; b < end; ++b) {
            const int64_t len = batch.lengths[b];
            const float* lp_row = lp + b * T;
            const float* ref_row = ref + b * T;
            if (!all_finite(lp_row, len)) return first_non_finite("logprobs", lp_row, b, len);
            if (!all_finite(ref_row, len)) return first_non_finite("ref_logprobs", ref_row, b, len);
            if (!std::isfinite(sc[b])) return {b, str("scores[", b, "]=", sc[b], " is not finite")};

            float* row = out + b * T;
            for (int64_t t = 0; t < len; ++t) row[t] = neg_kl_coef * (lp_row[t] - ref_row[t]);  // -beta * KL_t
            float score = sc[b];
            if (reward_clip) {
                const auto clip = static_cast<float>(*reward_clip);
                score = std::min(std::max(score, -clip), clip);
            }
            if (cut != nullptr) score = score + penalty * (cut[b] ? 1.0f : 0.0f);
            row[len - 1] = row[len - 1] + score;  // the sequence-level reward on the last token
            zero_tail(row, len, T);
            if (!all_finite(row, len))
                return {b, str("rewards overflow float32 in row ", b, " (kl_coef * |logprobs - ref_logprobs| too large)")};
        }
        return {};
    });
    return rewards;
}

// ---------------------------------------------------------------- GAE

namespace {

// Backwards through one sequence, from token `t` down to 0, carrying
// V_{t+1} (next_value) and A_{t+1} (last_gae).  The float operations are
// those of the torch loop (minirlhf/stages/ppo.py), in its order.
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

std::pair<Owned<float>, Owned<float>> gae(const Array& rewards, const Array& values, const Array& lengths,
                                          double gamma, double lam) {
    const Batch batch = batch_of(rewards, "rewards", lengths);
    const float* r = floats(rewards, "rewards", batch.shape());
    const float* v = floats(values, "values", batch.shape());
    check_unit_interval("gamma", gamma);
    check_unit_interval("lam", lam);

    const int64_t T = batch.max_len;
    const int64_t* len = batch.lengths;
    // Rounded as torch rounds `gamma * x` and `gamma * lam * x` for a float32 x.
    const float g = static_cast<float>(gamma);
    const float gl = static_cast<float>(gamma * lam);
    Owned<float> advantages = owned<float>(batch.shape()), returns = owned<float>(batch.shape());
    float* const adv = advantages.data.get();
    float* const ret = returns.data.get();

    parallel_rows(batch.size, batch.size * T, [&](int64_t begin, int64_t end) -> RowError {
        // A NaN or inf among a row's rewards or values makes its returns non-finite
        // too, so checking the returns (hot in cache) checks the inputs; on failure,
        // the first bad row of the chunk in row order, whatever the work order.
        auto first_bad = [&](int64_t overflow_row) -> RowError {
            for (int64_t b = begin; b < end; ++b) {
                if (!all_finite(r + b * T, len[b])) return first_non_finite("rewards", r + b * T, b, len[b]);
                if (!all_finite(v + b * T, len[b])) return first_non_finite("values", v + b * T, b, len[b]);
            }
            return {overflow_row, str("advantages or returns overflow float32 in row ", overflow_row)};
        };
        // Longest first, in groups of kGaeLanes of similar length: a group runs
        // interleaved for as long as its shortest member, the rest one by one.
        std::vector<int64_t> order(static_cast<size_t>(end - begin));
        std::iota(order.begin(), order.end(), begin);
        std::sort(order.begin(), order.end(),
                  [&](int64_t a, int64_t b) { return len[a] != len[b] ? len[a] > len[b] : a < b; });
        for (size_t first = 0; first < order.size(); first += kGaeLanes) {
            const size_t n = std::min(order.size() - first, static_cast<size_t>(kGaeLanes));
            GaeRow rows[kGaeLanes];
            for (size_t k = 0; k < n; ++k) rows[k] = GaeRow{order[first + k] * T, len[order[first + k]] - 1};
            if (n == kGaeLanes) gae_interleaved<kGaeLanes>(rows, len[order[first + n - 1]], r, v, adv, ret, g, gl);
            for (size_t k = 0; k < n; ++k) {
                const int64_t b = order[first + k];
                gae_finish(rows[k], r, v, adv, ret, g, gl);
                if (!all_finite(ret + b * T, len[b])) return first_bad(b);
                zero_tail(adv + b * T, len[b], T);
                zero_tail(ret + b * T, len[b], T);
            }
        }
        return {};
    });
    return {std::move(advantages), std::move(returns)};
}

// ---------------------------------------------------------------- whitening

Moments masked_moments(const Array& x, const Array& lengths, double shift) {
    const Batch batch = batch_of(x, "x", lengths);
    const float* data = floats(x, "x", batch.shape());
    if (!std::isfinite(shift)) fail(str("shift=", shift, " must be finite"));
    const int64_t T = batch.max_len;
    std::vector<std::pair<double, double>> rows(static_cast<size_t>(batch.size));
    parallel_rows(batch.size, batch.size * T, [&](int64_t begin, int64_t end) -> RowError {
        for (int64_t b = begin; b < end; ++b) {
            const float* row = data + b * T;
            if (!all_finite(row, batch.lengths[b])) return first_non_finite("x", row, b, batch.lengths[b]);
            rows[static_cast<size_t>(b)] = row_sums<true>(row, batch.lengths[b], shift);
        }
        return {};
    });
    Moments m;
    for (int64_t b = 0; b < batch.size; ++b) {  // in row order: the same sums on every run
        m.count += batch.lengths[b];
        m.sum += rows[static_cast<size_t>(b)].first;
        m.sum_squares += rows[static_cast<size_t>(b)].second;
    }
    return m;
}

Owned<float> whiten(const Array& x, const Array& lengths, bool shift_mean, std::optional<double> mean,
                    std::optional<double> var) {
    const Batch batch = batch_of(x, "x", lengths);
    const float* data = floats(x, "x", batch.shape());
    if (mean.has_value() != var.has_value())
        fail(str("whiten: mean and var go together (the statistics to use), got only ", mean ? "mean" : "var"));
    const bool given = mean.has_value();
    if (given && !std::isfinite(*mean)) fail(str("mean=", *mean, " must be finite"));
    if (given && !(*var >= 0.0 && std::isfinite(*var))) fail(str("var=", *var, " must be finite and >= 0"));
    const int64_t T = batch.max_len;

    if (!given) {
        // The batch's own: per row, the mean and the sum of squared deviations from
        // it (two passes over a row in cache), merged in row order with Chan et al.'s
        // pairwise update, so the result is the same on every run.
        std::vector<std::pair<double, double>> rows(static_cast<size_t>(batch.size));  // (mean, m2)
        parallel_rows(batch.size, batch.size * T, [&](int64_t begin, int64_t end) -> RowError {
            for (int64_t b = begin; b < end; ++b) {
                const float* row = data + b * T;
                const int64_t len = batch.lengths[b];
                if (!all_finite(row, len)) return first_non_finite("x", row, b, len);
                const double row_mean = row_sums<false>(row, len, 0.0).first / static_cast<double>(len);
                rows[static_cast<size_t>(b)] = {row_mean, row_sums<true>(row, len, row_mean).second};
            }
            return {};
        });
        int64_t n = 0;
        double m = 0.0, m2 = 0.0;
        for (int64_t b = 0; b < batch.size; ++b) {
            const int64_t count = batch.lengths[b], total = n + count;
            const auto [row_mean, row_m2] = rows[static_cast<size_t>(b)];
            const double delta = row_mean - m;
            m += delta * static_cast<double>(count) / static_cast<double>(total);
            m2 += row_m2 + delta * delta * static_cast<double>(n) * static_cast<double>(count) /
                               static_cast<double>(total);
            n = total;
        }
        if (n < 2) fail(str("whitening needs at least 2 valid tokens, got ", n));
        mean = m;
        var = m2 / static_cast<double>(n - 1);
    }

    // The mean as a float plus the float of what that drops: x - mean_hi is
    // exact for x near the mean (Sterbenz), so a large mean over a small
    // spread keeps its digits without double arithmetic per token.
    const auto mean_hi = static_cast<float>(*mean);
    const auto mean_lo = static_cast<float>(*mean - static_cast<double>(mean_hi));
    const auto inv_std = static_cast<float>(1.0 / std::sqrt(*var + 1e-8));
    const float shift = shift_mean ? 0.0f : mean_hi;
    Owned<float> whitened = owned<float>(batch.shape());
    float* const out = whitened.data.get();
    parallel_rows(batch.size, batch.size * T, [&](int64_t begin, int64_t end) -> RowError {
        for (int64_t b = begin; b < end; ++b) {
            const int64_t len = batch.lengths[b];
            const float* in = data + b * T;
            // (with the batch's own statistics, the pass above has checked the rows)
            if (given && !all_finite(in, len)) return first_non_finite("x", in, b, len);
            float* o = out + b * T;
            for (int64_t t = 0; t < len; ++t) o[t] = ((in[t] - mean_hi) - mean_lo) * inv_std + shift;
            zero_tail(o, len, T);
        }
        return {};
    });
    return whitened;
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

Owned<int64_t> minibatch_order(int64_t n, int64_t minibatch_size, int64_t seed) {
    if (n < 1) fail(str("n=", n, " must be >= 1"));
    if (minibatch_size < 1) fail(str("minibatch_size=", minibatch_size, " must be >= 1"));
    if (seed < 0) fail(str("seed=", seed, " must be >= 0"));
    Owned<int64_t> order = owned<int64_t>({n});
    int64_t* perm = order.data.get();
    std::iota(perm, perm + n, int64_t{0});
    SplitMix64 rng{static_cast<uint64_t>(seed)};
    for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates
        const auto j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
        std::swap(perm[i], perm[j]);
    }
    return order;
}

}  // namespace minirlhf
