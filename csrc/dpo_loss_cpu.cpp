// CPU implementation: pairs in parallel, the mean reduced in fixed chunks so the result does not depend on the
// number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dpo_loss_op.h"

namespace dpo_kernels {
namespace {

constexpr int64_t kChunk = 2048;

// The `Device` of dpo_loss_forward_on and dpo_loss_backward_on (dpo_loss_op.h).
struct Cpu {
  static constexpr const char* kName = "CPU";
  static bool holds(const at::Tensor& t) { return t.device().is_cpu(); }
  // The CPU has no current device to set.
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  template <typename T>
  static void forward(const DpoLossArgs<T>& a, const at::TensorOptions& /*options*/) {
    const int64_t num_chunks = (a.batch + kChunk - 1) / kChunk;
    std::vector<double> loss_sums(num_chunks), margin_sums(num_chunks);
    std::vector<int64_t> correct_counts(num_chunks);
    at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        double loss_sum = 0.0, margin_sum = 0.0;
        int64_t correct_count = 0;
        const int64_t end = std::min(a.batch, (chunk + 1) * kChunk);
        for (int64_t p = chunk * kChunk; p < end; ++p) {
          bool correct;
          T margin;
          loss_sum += static_cast<double>(dpo_pair(a, p, correct, margin));
          margin_sum += static_cast<double>(margin);
          correct_count += correct ? 1 : 0;
        }
        loss_sums[chunk] = loss_sum, margin_sums[chunk] = margin_sum, correct_counts[chunk] = correct_count;
      }
    });
    double loss_sum = 0.0, margin_sum = 0.0;
    int64_t correct_count = 0;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      loss_sum += loss_sums[chunk], margin_sum += margin_sums[chunk], correct_count += correct_counts[chunk];
    }
    const double b = static_cast<double>(a.batch);
    *a.loss = static_cast<T>(loss_sum / b);
    *a.reward_margin = static_cast<T>(margin_sum / b);
    *a.reward_accuracy = static_cast<T>(static_cast<double>(correct_count) / b);
  }

  template <typename T>
  static void backward(const DpoLossBackwardArgs& a, at::Tensor& out_chosen, at::Tensor& out_rejected) {
    const T g = *a.grad_loss.data_ptr<T>();
    const T* gc = a.grad_chosen.data_ptr<T>();
    const T* gr = a.grad_rejected.data_ptr<T>();
    T* oc = out_chosen.data_ptr<T>();
    T* orj = out_rejected.data_ptr<T>();
    at::parallel_for(0, a.grad_chosen.numel(), 32 * kChunk, [&](int64_t first, int64_t last) {
      for (int64_t p = first; p < last; ++p) {
        oc[p] = g * gc[p];
        orj[p] = g * gr[p];
      }
    });
  }
};

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("dpo_loss_forward", &dpo_kernels::dpo_loss_forward_on<dpo_kernels::Cpu>);
  m.impl("dpo_loss_backward", &dpo_kernels::dpo_loss_backward_on<dpo_kernels::Cpu>);
}
