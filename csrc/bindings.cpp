// Python bindings of rollout_buffer.h as minirlhf._rollout.  This file only
// binds: it checks what numpy can get wrong (dtype, rank, shape, contiguity,
// alignment, writability, overlap) without converting anything, then calls the
// library with the GIL released.  minirlhf/rollout.py is the friendly face.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "rollout_buffer.h"

namespace py = pybind11;
using namespace minirlhf;

namespace {

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
    std::ostringstream out;
    (out << ... << parts);
    throw std::invalid_argument(out.str());
}

std::string shape_of(const py::array& a) {
    std::ostringstream out;
    out << "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) out << (i ? ", " : "") << a.shape(i);
    out << (a.ndim() == 1 ? ",)" : ")");
    return out.str();
}

// Layout every array must have: C-contiguous, aligned, native byte order.
void check_layout(const py::array& a, const char* name) {
    constexpr int kContiguous = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_;
    constexpr int kAligned = py::detail::npy_api::NPY_ARRAY_ALIGNED_;
    if (!(a.flags() & kContiguous)) fail(name, " must be C-contiguous (np.ascontiguousarray)");
    if (!(a.flags() & kAligned)) fail(name, " must be aligned");
    const char order = a.dtype().byteorder();
    const uint16_t probe = 1;
    const char native = *reinterpret_cast<const char*>(&probe) == 1 ? '<' : '>';
    if (order != '=' && order != '|' && order != native) fail(name, " must be in native byte order");
}

template <typename T>
void check_dtype(const py::array& a, const char* name) {
    if (a.dtype().normalized_num() != py::dtype::num_of<T>())
        fail(name, " must have dtype ", py::str(py::dtype::of<T>()).cast<std::string>(), ", got ",
             py::str(a.dtype()).cast<std::string>());
}

// An array of dtype T and the given shape (-1: any extent).
template <typename T>
void check_array(const py::array& a, const char* name, std::vector<py::ssize_t> shape) {
    check_dtype<T>(a, name);
    if (a.ndim() != static_cast<py::ssize_t>(shape.size()))
        fail(name, " must have ", shape.size(), " dimension", shape.size() == 1 ? "" : "s", ", got shape ",
             shape_of(a));
    for (size_t i = 0; i < shape.size(); ++i)
        if (shape[i] >= 0 && a.shape(static_cast<py::ssize_t>(i)) != shape[i]) {
            std::ostringstream want;
            want << "(";
            for (size_t j = 0; j < shape.size(); ++j) {
                want << (j ? ", " : "");
                if (shape[j] >= 0) want << shape[j]; else want << "*";
            }
            want << (shape.size() == 1 ? ",)" : ")");
            fail(name, " has shape ", shape_of(a), ", expected ", want.str());
        }
    check_layout(a, name);
}

void check_writeable(const py::array& a, const char* name) {
    if (!a.writeable()) fail(name, " is read-only");
}

struct Bytes {
    const char* begin;
    const char* end;
};
Bytes bytes_of(const py::array& a) {
    const auto* p = static_cast<const char*>(a.data());
    return {p, p + a.nbytes()};
}
bool overlap(const py::array& a, const py::array& b) {
    const Bytes x = bytes_of(a), y = bytes_of(b);
    return x.begin < y.end && y.begin < x.end;
}

// The element-wise operations read an input entry before they write the same
// output entry, so an output may be the very same array as an input, but not
// a shifted or partial view of it.
void check_alias(const py::array& out, const char* out_name, const py::array& in, const char* in_name) {
    if (!overlap(out, in)) return;
    if (out.data() == in.data() && out.nbytes() == in.nbytes()) return;
    fail(out_name, " partially overlaps ", in_name, " (an output may only be the very same array)");
}
void check_disjoint(const py::array& out, const char* out_name, const py::array& other, const char* other_name) {
    if (overlap(out, other)) fail(out_name, " shares memory with ", other_name);
}

// lengths: (B,) int64, the batch shape for (B, T) arrays.
Batch batch_of(const py::array& lengths, py::ssize_t T) {
    check_array<int64_t>(lengths, "lengths", {-1});
    return Batch{static_cast<int64_t>(lengths.shape(0)), static_cast<int64_t>(T),
                 static_cast<const int64_t*>(lengths.data())};
}

// (B, T) float32 with B = len(lengths), T taken from `first`.
void check_padded(const py::array& a, const char* name, const py::array& lengths, py::ssize_t T) {
    check_array<float>(a, name, {lengths.shape(0), T});
}

py::ssize_t width_of(const py::array& a, const char* name) {
    if (a.ndim() != 2) fail(name, " must have 2 dimensions (B, T), got shape ", shape_of(a));
    return a.shape(1);
}

template <typename T>
const T* ptr(const py::array& a) {
    return static_cast<const T*>(a.data());
}
template <typename T>
T* mut(py::array& a) {
    return static_cast<T*>(a.mutable_data());
}

// ------------------------------------------------------------------ bound functions

void bind_assemble_rewards(py::array old_logprobs, py::array ref_logprobs, py::array scores,
                           py::array lengths, py::object hit_max, double kl_coef, double no_eos_penalty,
                           double reward_clip, py::array out) {
    const py::ssize_t T = width_of(old_logprobs, "old_logprobs");
    const Batch batch = batch_of(lengths, T);
    check_padded(old_logprobs, "old_logprobs", lengths, T);
    check_padded(ref_logprobs, "ref_logprobs", lengths, T);
    check_array<float>(scores, "scores", {lengths.shape(0)});
    const uint8_t* hit = nullptr;
    py::array hit_array;
    if (!hit_max.is_none()) {
        if (!py::isinstance<py::array>(hit_max)) fail("hit_max must be a numpy bool array or None");
        hit_array = hit_max.cast<py::array>();
        check_array<bool>(hit_array, "hit_max", {lengths.shape(0)});
        hit = ptr<uint8_t>(hit_array);
    }
    check_padded(out, "out", lengths, T);
    check_writeable(out, "out");
    check_alias(out, "out", old_logprobs, "old_logprobs");
    check_alias(out, "out", ref_logprobs, "ref_logprobs");
    check_disjoint(out, "out", scores, "scores");
    check_disjoint(out, "out", lengths, "lengths");
    if (hit) check_disjoint(out, "out", hit_array, "hit_max");
    const RewardParams params{kl_coef, no_eos_penalty, reward_clip};
    float* rewards = mut<float>(out);
    py::gil_scoped_release nogil;
    assemble_rewards(batch, ptr<float>(old_logprobs), ptr<float>(ref_logprobs), ptr<float>(scores), hit,
                     params, rewards);
}

void bind_gae(py::array rewards, py::array values, py::array lengths, double gamma, double lam,
              py::array out_advantages, py::array out_returns) {
    const py::ssize_t T = width_of(rewards, "rewards");
    const Batch batch = batch_of(lengths, T);
    check_padded(rewards, "rewards", lengths, T);
    check_padded(values, "values", lengths, T);
    check_padded(out_advantages, "out_advantages", lengths, T);
    check_padded(out_returns, "out_returns", lengths, T);
    check_writeable(out_advantages, "out_advantages");
    check_writeable(out_returns, "out_returns");
    check_disjoint(out_advantages, "out_advantages", out_returns, "out_returns");
    for (auto [out, name] : {std::pair{&out_advantages, "out_advantages"}, std::pair{&out_returns, "out_returns"}}) {
        check_alias(*out, name, rewards, "rewards");
        check_alias(*out, name, values, "values");
        check_disjoint(*out, name, lengths, "lengths");
    }
    float* adv = mut<float>(out_advantages);
    float* ret = mut<float>(out_returns);
    py::gil_scoped_release nogil;
    gae(batch, ptr<float>(rewards), ptr<float>(values), gamma, lam, adv, ret);
}

py::tuple bind_masked_moments(py::array x, py::array lengths) {
    const py::ssize_t T = width_of(x, "x");
    const Batch batch = batch_of(lengths, T);
    check_padded(x, "x", lengths, T);
    Moments m;
    {
        py::gil_scoped_release nogil;
        m = masked_moments(batch, ptr<float>(x), "x");
    }
    return py::make_tuple(m.count, m.mean, m.var);
}

void bind_whiten(py::array x, py::array lengths, bool keep_mean, py::array out) {
    const py::ssize_t T = width_of(x, "x");
    const Batch batch = batch_of(lengths, T);
    check_padded(x, "x", lengths, T);
    check_padded(out, "out", lengths, T);
    check_writeable(out, "out");
    check_alias(out, "out", x, "x");
    check_disjoint(out, "out", lengths, "lengths");
    float* o = mut<float>(out);
    py::gil_scoped_release nogil;
    whiten(batch, ptr<float>(x), keep_mean, o);
}

py::array bind_permutation(int64_t n, int64_t seed) {
    if (n < 1) fail("n=", n, " must be >= 1");
    if (seed < 0) fail("seed=", seed, " must be >= 0");
    py::array_t<int64_t> out(n);
    int64_t* to = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        const std::vector<int64_t> perm = permutation(n, static_cast<uint64_t>(seed));
        std::copy(perm.begin(), perm.end(), to);
    }
    return std::move(out);
}

// out[i] = src[idx[i], :width, ...]; for a 1-D src, out[i] = src[idx[i]].
void bind_gather_rows(py::array src, py::array idx, int64_t width, py::array out) {
    if (src.ndim() < 1) fail("src must have at least 1 dimension");
    check_layout(src, "src");
    check_array<int64_t>(idx, "idx", {-1});
    std::vector<py::ssize_t> want(src.shape(), src.shape() + src.ndim());
    want[0] = idx.shape(0);
    int64_t inner = 1;  // elements per token after the first two dimensions
    for (py::ssize_t d = 2; d < src.ndim(); ++d) inner *= src.shape(d);
    int64_t row_elems = 1;
    if (src.ndim() >= 2) {
        if (width < 1 || width > src.shape(1))
            fail("width=", width, " is outside [1, ", src.shape(1), "] for src of shape ", shape_of(src));
        want[1] = width;
        row_elems = width * inner;
    }
    if (!out.dtype().equal(src.dtype()))
        fail("out must have the dtype of src (", py::str(src.dtype()).cast<std::string>(), "), got ",
             py::str(out.dtype()).cast<std::string>());
    if (out.ndim() != src.ndim()) fail("out has shape ", shape_of(out), ", expected ", src.ndim(), " dimensions");
    for (py::ssize_t d = 0; d < out.ndim(); ++d)
        if (out.shape(d) != want[static_cast<size_t>(d)])
            fail("out has shape ", shape_of(out), " but gathering ", idx.shape(0), " rows needs dimension ", d, " = ",
                 want[static_cast<size_t>(d)]);
    check_layout(out, "out");
    check_writeable(out, "out");
    check_disjoint(out, "out", src, "src");
    check_disjoint(out, "out", idx, "idx");
    const int64_t item = src.itemsize();
    const int64_t stride = src.ndim() >= 2 ? src.shape(1) * inner * item : item;
    const void* from = src.data();
    void* to = out.mutable_data();
    const int64_t n_src = src.shape(0), n_idx = idx.shape(0);
    py::gil_scoped_release nogil;
    gather_rows(from, n_src, stride, ptr<int64_t>(idx), n_idx, row_elems * item, to);
}

py::tuple bind_pack(py::array lengths, int64_t budget) {
    check_array<int64_t>(lengths, "lengths", {-1});
    const int64_t n = lengths.shape(0);
    Packing p;
    {
        py::gil_scoped_release nogil;
        p = pack(ptr<int64_t>(lengths), n, budget);
    }
    py::array_t<int64_t> row(n), offset(n), position_ids({p.n_rows, budget}), segment_ids({p.n_rows, budget});
    int64_t* row_to = row.mutable_data();
    int64_t* offset_to = offset.mutable_data();
    int64_t* pos = position_ids.mutable_data();
    int64_t* seg = segment_ids.mutable_data();
    {
        py::gil_scoped_release nogil;
        std::copy(p.row_of_seq.begin(), p.row_of_seq.end(), row_to);
        std::copy(p.offset_of_seq.begin(), p.offset_of_seq.end(), offset_to);
        packing_ids(ptr<int64_t>(lengths), n, budget, p, pos, seg);
    }
    return py::make_tuple(row, offset, position_ids, segment_ids);
}

// A Packing from the arrays pack() returned (copied without the GIL); n_rows from `packed`.
Packing packing_of(const py::array& lengths, const py::array& row_of_seq, const py::array& offset_of_seq,
                   py::ssize_t n_rows) {
    check_array<int64_t>(row_of_seq, "row_of_seq", {lengths.shape(0)});
    check_array<int64_t>(offset_of_seq, "offset_of_seq", {lengths.shape(0)});
    const int64_t* row = ptr<int64_t>(row_of_seq);
    const int64_t* offset = ptr<int64_t>(offset_of_seq);
    const auto n = static_cast<size_t>(row_of_seq.shape(0));
    Packing p;
    p.n_rows = n_rows;
    py::gil_scoped_release nogil;
    p.row_of_seq.assign(row, row + n);
    p.offset_of_seq.assign(offset, offset + n);
    return p;
}

// padded (B, T, ...) and packed (R, budget, ...) share dtype and trailing dimensions.
int64_t check_pack_pair(const py::array& padded, const py::array& packed, const py::array& lengths) {
    check_array<int64_t>(lengths, "lengths", {-1});
    if (padded.ndim() < 2) fail("padded must have at least 2 dimensions (B, T, ...), got shape ", shape_of(padded));
    if (padded.shape(0) != lengths.shape(0))
        fail("padded has shape ", shape_of(padded), " but lengths has ", lengths.shape(0), " entries");
    if (packed.ndim() != padded.ndim())
        fail("packed has shape ", shape_of(packed), ", padded has shape ", shape_of(padded));
    for (py::ssize_t d = 2; d < padded.ndim(); ++d)
        if (packed.shape(d) != padded.shape(d))
            fail("packed has shape ", shape_of(packed), ", padded has shape ", shape_of(padded));
    if (!packed.dtype().equal(padded.dtype()))
        fail("packed has dtype ", py::str(packed.dtype()).cast<std::string>(), ", padded has dtype ",
             py::str(padded.dtype()).cast<std::string>());
    check_layout(padded, "padded");
    check_layout(packed, "packed");
    check_disjoint(packed, "packed", padded, "padded");
    int64_t token_bytes = padded.itemsize();
    for (py::ssize_t d = 2; d < padded.ndim(); ++d) token_bytes *= padded.shape(d);
    return token_bytes;
}

void bind_pack_rows(py::array padded, py::array lengths, py::array row_of_seq, py::array offset_of_seq,
                    py::array packed) {
    const int64_t token_bytes = check_pack_pair(padded, packed, lengths);
    check_writeable(packed, "packed");
    const Packing p = packing_of(lengths, row_of_seq, offset_of_seq, packed.shape(0));
    const int64_t n = lengths.shape(0), T = padded.shape(1), budget = packed.shape(1);
    void* to = packed.mutable_data();
    py::gil_scoped_release nogil;
    pack_rows(padded.data(), ptr<int64_t>(lengths), n, T, token_bytes, p, budget, to);
}

void bind_unpack_rows(py::array packed, py::array lengths, py::array row_of_seq, py::array offset_of_seq,
                      py::array padded) {
    const int64_t token_bytes = check_pack_pair(padded, packed, lengths);
    check_writeable(padded, "padded");
    const Packing p = packing_of(lengths, row_of_seq, offset_of_seq, packed.shape(0));
    const int64_t n = lengths.shape(0), T = padded.shape(1), budget = packed.shape(1);
    void* to = padded.mutable_data();
    py::gil_scoped_release nogil;
    unpack_rows(packed.data(), ptr<int64_t>(lengths), n, T, token_bytes, p, budget, to);
}

void bind_check_lengths(py::array lengths, int64_t max_len) {
    const Batch batch = batch_of(lengths, max_len);
    py::gil_scoped_release nogil;
    check_batch(batch);
}

}  // namespace

PYBIND11_MODULE(_rollout, m) {
    m.doc() = "PPO rollout bookkeeping in C++ (see csrc/rollout_buffer.h); use minirlhf.rollout.";
    using namespace py::literals;
    m.def("assemble_rewards", &bind_assemble_rewards, "old_logprobs"_a, "ref_logprobs"_a, "scores"_a,
          "lengths"_a, "hit_max"_a, "kl_coef"_a, "no_eos_penalty"_a, "reward_clip"_a, "out"_a);
    m.def("gae", &bind_gae, "rewards"_a, "values"_a, "lengths"_a, "gamma"_a, "lam"_a, "out_advantages"_a,
          "out_returns"_a);
    m.def("masked_moments", &bind_masked_moments, "x"_a, "lengths"_a,
          "(count, mean, unbiased variance) of x over valid tokens");
    m.def("whiten", &bind_whiten, "x"_a, "lengths"_a, "keep_mean"_a, "out"_a);
    m.def("permutation", &bind_permutation, "n"_a, "seed"_a);
    m.def("gather_rows", &bind_gather_rows, "src"_a, "idx"_a, "width"_a, "out"_a);
    m.def("pack", &bind_pack, "lengths"_a, "budget"_a);
    m.def("pack_rows", &bind_pack_rows, "padded"_a, "lengths"_a, "row_of_seq"_a, "offset_of_seq"_a, "packed"_a);
    m.def("unpack_rows", &bind_unpack_rows, "packed"_a, "lengths"_a, "row_of_seq"_a, "offset_of_seq"_a,
          "padded"_a);
    m.def("check_lengths", &bind_check_lengths, "lengths"_a, "max_len"_a);
    m.def("set_num_threads", &set_num_threads, "n"_a);
    m.def("get_num_threads", &num_threads);
}
