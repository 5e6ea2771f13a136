// The CPU side of the loss ops' CPU binding (loss_ops_cpu.cpp): the `Device` basics of
// loss_op_host.h, the fixed-chunk reduction that keeps the batch sums independent of the number of threads, and the
// backward's scaling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace dpo_kernels {

constexpr int64_t kCpuChunk = 2048;

// kName, holds and Guard of a CPU `Device`; each op's binding adds its kernels.
struct CpuDevice {
  static constexpr const char* kName = "CPU";
  static bool holds(const at::Tensor& t) { return t.device().is_cpu(); }
  // The CPU has no current device to set.
  struct Guard {
    explicit Guard(c10::Device) {}
  };
};

// `zero` with add_item(partial, i) applied for every i in [0, n): in chunks of kCpuChunk, each summed in order from
// `zero` (the chunks in parallel), then merge(total, chunk's partial) over the chunks in order.
template <typename Partial, typename AddItem, typename Merge>
Partial sum_in_fixed_chunks(int64_t n, const Partial& zero, const AddItem& add_item, const Merge& merge) {
  const int64_t num_chunks = (n + kCpuChunk - 1) / kCpuChunk;
  std::vector<Partial> partials(num_chunks, zero);
  at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const int64_t end = std::min(n, (chunk + 1) * kCpuChunk);
      for (int64_t i = chunk * kCpuChunk; i < end; ++i) add_item(partials[chunk], i);
    }
  });
  Partial total = zero;
  for (const Partial& p : partials) merge(total, p);
  return total;
}

// out = grad_loss[0] * coefficients: the backward of every loss op. All three are contiguous, of type T.
template <typename T>
void scale_by_upstream_grad(const at::Tensor& grad_loss, const at::Tensor& coefficients, at::Tensor& out) {
  const T g = *grad_loss.data_ptr<T>();
  const T* in = coefficients.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, coefficients.numel(), 32 * kCpuChunk, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) o[i] = g * in[i];
  });
}

}  // namespace dpo_kernels
