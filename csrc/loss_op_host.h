// The host machinery every loss op (dpo_loss_op.h, group_loss_op.h) runs its CPU and CUDA bindings through: the
// device check, the guard held for the call, the float32/float64 dispatch, and the argument checks the ops share.
// A `Device` gives
//   kName, holds(tensor)   the device's name for errors, and whether a tensor is on it;
//   Guard(device)          held for the whole call: makes the inputs' device current;
// and the kernels of each op that runs on it (named in that op's header).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace dpo_kernels {

template <typename Device>
void check_on_device(const at::Tensor& t, const char* op) {
  TORCH_CHECK(Device::holds(t), op, " (", Device::kName, ") got a tensor on ", t.device());
}

// Runs `body()` for the op `op` on `anchor`'s device, which must be `Device`'s, holding `Device`'s guard throughout.
template <typename Device, typename Body>
auto run_on_device(const at::Tensor& anchor, const char* op, const Body& body) {
  check_on_device<Device>(anchor, op);
  const typename Device::Guard guard(anchor.device());
  return body();
}

// Calls `body(T())` with T the compute type of `dtype`: double for float64, float for float32 (the ops admit only
// these two before they dispatch).
template <typename Body>
void dispatch_float_or_double(at::ScalarType dtype, const Body& body) {
  if (dtype == at::kDouble) {
    body(double());
  } else {
    body(float());
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// An optional input beside `like` (named `like_name` in the errors of `op`): undefined when absent, else checked to
// have `like`'s shape and device and `dtype`, and returned contiguous.
at::Tensor vector_like(const std::optional<at::Tensor>& t, const at::Tensor& like, at::ScalarType dtype,
                       const char* op, const char* like_name, const char* name);

// The backward ops' upstream gradient: checked to have one element, returned contiguous in `dtype` (the
// coefficients').
at::Tensor upstream_grad(const at::Tensor& grad_loss, at::ScalarType dtype, const char* op);

}  // namespace dpo_kernels
