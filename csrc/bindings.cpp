// Python bindings of rollout_buffer.h as minirlhf._rollout.  This file only
// binds: it describes each argument to the library as an Array (checking
// nothing: the library checks everything, once), calls it with the GIL
// released, and hands its results to numpy without a copy.
// minirlhf/rollout.py is the Python face (torch tensors in and out).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <utility>

#include "rollout_buffer.h"

namespace py = pybind11;
using namespace minirlhf;

namespace {

// What x is, for the library: a numpy array's memory, dtype, shape and layout;
// anything else by name (with its dtype and device when it has them, as a
// tensor numpy cannot share does).
Array describe(const py::object& x) {
    Array a;
    if (!py::isinstance<py::array>(x)) {
        a.what = py::str(py::type::of(x).attr("__name__"));
        if (py::hasattr(x, "dtype") && py::hasattr(x, "device"))
            a.what = py::str("{} {} on {}").format(x.attr("dtype"), a.what, x.attr("device"));
        return a;
    }
    const auto arr = py::reinterpret_borrow<py::array>(x);
    a.is_array = true;
    a.data = arr.data();
    a.shape.assign(arr.shape(), arr.shape() + arr.ndim());
    const py::dtype dtype = arr.dtype();
    const char kind = dtype.kind();
    const py::ssize_t size = dtype.itemsize();
    a.dtype = kind == 'f' && size == 4   ? DType::float32
              : kind == 'i' && size == 8 ? DType::int64
              : kind == 'b' && size == 1 ? DType::boolean
                                         : DType::other;
    if (a.dtype == DType::other) a.what = py::str(dtype);
    const uint16_t probe = 1;
    const char native = *reinterpret_cast<const char*>(&probe) == 1 ? '<' : '>';
    const char order = dtype.byteorder();
    constexpr int kContiguous = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_;
    constexpr int kAligned = py::detail::npy_api::NPY_ARRAY_ALIGNED_;
    a.standard_layout = (arr.flags() & kContiguous) && (arr.flags() & kAligned) &&
                        (order == '=' || order == '|' || order == native);
    return a;
}

// A library result as a numpy array that owns its memory (freed with the array).
template <typename T>
py::array to_numpy(Owned<T> result) {
    py::capsule owner(result.data.get(), [](void* p) { delete[] static_cast<T*>(p); });
    T* data = result.data.release();  // the capsule frees it now
    return py::array_t<T>(result.shape, data, owner);
}

py::array bind_per_token_rewards(const py::object& logprobs, const py::object& ref_logprobs,
                                 const py::object& scores, const py::object& lengths, double kl_coef,
                                 const py::object& truncated, double truncation_penalty,
                                 std::optional<double> reward_clip) {
    const Array lp = describe(logprobs), ref = describe(ref_logprobs), sc = describe(scores),
                lens = describe(lengths);
    const std::optional<Array> cut = truncated.is_none() ? std::nullopt : std::optional(describe(truncated));
    Owned<float> rewards;
    {
        py::gil_scoped_release nogil;
        rewards = per_token_rewards(lp, ref, sc, lens, kl_coef, cut ? &*cut : nullptr, truncation_penalty,
                                    reward_clip);
    }
    return to_numpy(std::move(rewards));
}

py::tuple bind_gae(const py::object& rewards, const py::object& values, const py::object& lengths, double gamma,
                   double lam) {
    const Array r = describe(rewards), v = describe(values), lens = describe(lengths);
    std::pair<Owned<float>, Owned<float>> out;
    {
        py::gil_scoped_release nogil;
        out = gae(r, v, lens, gamma, lam);
    }
    return py::make_tuple(to_numpy(std::move(out.first)), to_numpy(std::move(out.second)));
}

py::array bind_whiten(const py::object& x, const py::object& lengths, bool shift_mean, std::optional<double> mean,
                      std::optional<double> var) {
    const Array a = describe(x), lens = describe(lengths);
    Owned<float> out;
    {
        py::gil_scoped_release nogil;
        out = whiten(a, lens, shift_mean, mean, var);
    }
    return to_numpy(std::move(out));
}

py::tuple bind_masked_moments(const py::object& x, const py::object& lengths, double shift) {
    const Array a = describe(x), lens = describe(lengths);
    Moments m;
    {
        py::gil_scoped_release nogil;
        m = masked_moments(a, lens, shift);
    }
    return py::make_tuple(m.count, m.sum, m.sum_squares);
}

py::array bind_minibatch_order(int64_t n, int64_t minibatch_size, int64_t seed) {
    Owned<int64_t> order;
    {
        py::gil_scoped_release nogil;
        order = minibatch_order(n, minibatch_size, seed);
    }
    return to_numpy(std::move(order));
}

}  // namespace

PYBIND11_MODULE(_rollout, m) {
    m.doc() = "PPO rollout bookkeeping in C++ (csrc/rollout_buffer.h); use minirlhf.rollout.";
    using namespace py::literals;
    m.def("per_token_rewards", &bind_per_token_rewards, "logprobs"_a, "ref_logprobs"_a, "scores"_a, "lengths"_a,
          "kl_coef"_a, "truncated"_a, "truncation_penalty"_a, "reward_clip"_a);
    m.def("gae", &bind_gae, "rewards"_a, "values"_a, "lengths"_a, "gamma"_a, "lam"_a);
    m.def("whiten", &bind_whiten, "x"_a, "lengths"_a, "shift_mean"_a, "mean"_a, "var"_a);
    m.def("masked_moments", &bind_masked_moments, "x"_a, "lengths"_a, "shift"_a);
    m.def("minibatch_order", &bind_minibatch_order, "n"_a, "minibatch_size"_a, "seed"_a);
    m.def("set_num_threads", &set_num_threads, "n"_a);
    m.def("get_num_threads", &num_threads);
}
