// CPU implementation of the group DPO loss: groups in parallel, the batch sums reduced in fixed chunks (the
// pairwise op's), so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "group_loss_op.h"

namespace dpo_kernels {
namespace {

constexpr int64_t kChunk = 2048;

// The `Device` of group_loss_forward_on and group_loss_backward_on (group_loss_op.h).
struct Cpu {
  static constexpr const char* kName = "CPU";
  static bool holds(const at::Tensor& t) { return t.device().is_cpu(); }
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  template <typename T>
  static void forward(const GroupLossArgs<T>& a) {
    const int64_t num_chunks = (a.num_groups + kChunk - 1) / kChunk;
    std::vector<GroupPartial> partials(num_chunks, group_partial_zero());
    at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t end = std::min(a.num_groups, (chunk + 1) * kChunk);
        for (int64_t g = chunk * kChunk; g < end; ++g) add_partial(partials[chunk], group_forward(a, g));
      }
    });
    GroupPartial total = group_partial_zero();
    for (const GroupPartial& p : partials) add_partial(total, p);
    const T sft = write_group_scalars(a, total);
    const T inv_kept = T(1) / T(total.kept > 0 ? total.kept : 1);
    const T total_len = static_cast<T>(total.sft_len < 1.0 ? 1.0 : total.sft_len);
    at::parallel_for(0, a.num_groups, kChunk, [&](int64_t first, int64_t last) {
      for (int64_t g = first; g < last; ++g) group_finish(a, g, inv_kept, sft, total_len);
    });
  }

  template <typename T>
  static void backward(const GroupLossBackwardArgs& a, at::Tensor& out) {
    const T g = *a.grad_loss.data_ptr<T>();
    const T* in = a.grad.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, a.grad.numel(), 32 * kChunk, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) o[i] = g * in[i];
    });
  }
};

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("group_loss_forward", &dpo_kernels::group_loss_forward_on<dpo_kernels::Cpu>);
  m.impl("group_loss_backward", &dpo_kernels::group_loss_backward_on<dpo_kernels::Cpu>);
}
