#pragma once
// The schema-facing side of the element-wise ops (NOTE: [element-wise ops] in elementwise_ops.h): one
// function per functor whose signature matches its schema line, generated from the functor's counts, which
// checks the arguments and hands lists and scalars to a backend (CPU or CUDA).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstddef>
#include <optional>
#include <utility>

#include "mrgd_ext/checks.h"
#include "mrgd_ext/elementwise_ops.h"

namespace mrgd_ext {

// One call of an element-wise op, its schema arguments unpacked. scalars holds the op's floats; the
// backend appends the gradient factor (computed from maximize and grad_scale) when Fn::kGradFactor.
template <typename Fn>
struct ElementwiseCall {
  std::array<at::TensorList, Fn::kLists> lists;
  std::array<double, kNumScalars<Fn> + 1> scalars{};  // + 1: room for an op without scalars
  bool maximize = false;
  const at::Tensor* grad_scale = nullptr;  // defined 1-element float32 tensors, or nullptr
  const at::Tensor* found_inf = nullptr;
};

template <std::size_t>
using TensorListArg = at::TensorList;
template <std::size_t>
using DoubleArg = double;

// ElementwiseOp<Fn, Backend>::fn() is the kernel to register under Fn::kName: `Backend::template run<Fn>`
// receives the checked call (never with empty lists).
template <typename Fn, typename Backend, typename Lists = std::make_index_sequence<Fn::kLists>,
          typename Scalars = std::make_index_sequence<Fn::kScalars>>
struct ElementwiseOp;

template <typename Fn, typename Backend, std::size_t... L, std::size_t... S>
struct ElementwiseOp<Fn, Backend, std::index_sequence<L...>, std::index_sequence<S...>> {
  static void dispatch(ElementwiseCall<Fn>& call) {
    for (int i = 0; i < Fn::kScalars; ++i) check_finite_scalar(call.scalars[i], Fn::kScalarNames[i]);
    check_tensor_lists(call.lists.data(), Fn::kListNames, Fn::kLists);
    if (call.lists[0].empty()) return;
    const at::Device device = call.lists[0][0].device();
    check_scalar_flag(call.grad_scale, "grad_scale", device);
    check_scalar_flag(call.found_inf, "found_inf", device);
    Backend::template run<Fn>(call);
  }
  static void plain(TensorListArg<L>... lists, DoubleArg<S>... scalars) {
    ElementwiseCall<Fn> call{{lists...}, {scalars...}};
    dispatch(call);
  }
  static void with_grad_factor(TensorListArg<L>... lists, DoubleArg<S>... scalars, bool maximize,
                               const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf) {
    ElementwiseCall<Fn> call{{lists...}, {scalars...}, maximize, grad_scale ? &*grad_scale : nullptr,
                             found_inf ? &*found_inf : nullptr};
    dispatch(call);
  }
  static constexpr auto fn() {
    if constexpr (Fn::kGradFactor) return &with_grad_factor;
    else return &plain;
  }
};

}  // namespace mrgd_ext
