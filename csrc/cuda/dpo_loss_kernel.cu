// The DPO loss on the GPU: a single persistent block strides over the pairs, each thread keeps double partial sums,
// and a shared-memory tree reduces them in a fixed order (deterministic for any B, 1 to millions, in one launch).
// The op is launch-bound at training batch sizes, so one block costs nothing there; at B = 1e6 it streams ~40 MB
// through one SM, a fraction of a millisecond. The backward is one grid-stride launch scaling the saved coefficients.
#include "dpo_loss_kernel.h"

#include <algorithm>

namespace dpo_kernels {
namespace {

constexpr int kThreads = 512;

template <typename T>
__global__ void __launch_bounds__(kThreads) dpo_loss_fwd_kernel(const DpoLossArgs<T> a) {
  __shared__ double loss_sums[kThreads];
  __shared__ double margin_sums[kThreads];
  __shared__ long long correct_counts[kThreads];
  double loss_sum = 0.0, margin_sum = 0.0;
  long long correct_count = 0;
  for (int64_t p = threadIdx.x; p < a.batch; p += kThreads) {
    bool correct;
    T margin;
    loss_sum += static_cast<double>(dpo_pair(a, p, correct, margin));
    margin_sum += static_cast<double>(margin);
    correct_count += correct ? 1 : 0;
  }
  loss_sums[threadIdx.x] = loss_sum;
  margin_sums[threadIdx.x] = margin_sum;
  correct_counts[threadIdx.x] = correct_count;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      loss_sums[threadIdx.x] += loss_sums[threadIdx.x + stride];
      margin_sums[threadIdx.x] += margin_sums[threadIdx.x + stride];
      correct_counts[threadIdx.x] += correct_counts[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double b = static_cast<double>(a.batch);
    *a.loss = static_cast<T>(loss_sums[0] / b);
    *a.reward_margin = static_cast<T>(margin_sums[0] / b);
    *a.reward_accuracy = static_cast<T>(static_cast<double>(correct_counts[0]) / b);
  }
}

template <typename T>
__global__ void dpo_loss_bwd_kernel(const T* __restrict__ grad_loss, const T* __restrict__ grad_chosen,
                                    const T* __restrict__ grad_rejected, T* __restrict__ out_chosen,
                                    T* __restrict__ out_rejected, int64_t batch) {
  const T g = *grad_loss;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < batch; p += stride) {
    out_chosen[p] = g * grad_chosen[p];
    out_rejected[p] = g * grad_rejected[p];
  }
}

}  // namespace

template <typename T>
cudaError_t launch_dpo_loss_backward(const T* grad_loss, const T* grad_chosen, const T* grad_rejected,
                                     T* out_chosen, T* out_rejected, int64_t batch, cudaStream_t stream) {
  constexpr int64_t kBackwardThreads = 256;
  constexpr int64_t kMaxBlocks = 1024;  // grid-stride beyond this: a few waves saturate any GPU's bandwidth
  const int64_t blocks = std::min(kMaxBlocks, std::max<int64_t>(1, (batch + kBackwardThreads - 1) / kBackwardThreads));
  dpo_loss_bwd_kernel<T><<<static_cast<unsigned>(blocks), kBackwardThreads, 0, stream>>>(
      grad_loss, grad_chosen, grad_rejected, out_chosen, out_rejected, batch);
  return cudaGetLastError();
}

template cudaError_t launch_dpo_loss_backward<float>(const float*, const float*, const float*, float*, float*,
                                                     int64_t, cudaStream_t);
template cudaError_t launch_dpo_loss_backward<double>(const double*, const double*, const double*, double*, double*,
                                                      int64_t, cudaStream_t);

template <typename T>
cudaError_t launch_dpo_loss_forward(const DpoLossArgs<T>& args, cudaStream_t stream) {
  dpo_loss_fwd_kernel<T><<<1, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template cudaError_t launch_dpo_loss_forward<float>(const DpoLossArgs<float>&, cudaStream_t);
template cudaError_t launch_dpo_loss_forward<double>(const DpoLossArgs<double>&, cudaStream_t);

}  // namespace dpo_kernels
