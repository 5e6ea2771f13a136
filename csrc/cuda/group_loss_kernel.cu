// The group DPO loss on the GPU: one block; each thread strides over groups (one group's responses sit in the
// thread's local arrays, K <= kMaxGroupSize), a shared-memory tree adds the partial sums in a fixed order, and after
// the barrier the threads scale every group's coefficients by the batch's 1 / N. The backward is one grid-stride
// launch scaling the saved coefficients.
#include "group_loss_kernel.h"

#include <algorithm>

namespace dpo_kernels {
namespace {

constexpr int kThreads = 512;  // the pairwise kernel's: at K = 2 both add the same values in the same order

// Fixed-order tree over the block's threads; every thread gets the sum. Every thread must call it.
__device__ GroupPartial block_sum(GroupPartial s) {
  __shared__ double sums[3][kThreads];
  __shared__ long long counts[5][kThreads];
  const int t = threadIdx.x;
  sums[0][t] = s.loss, sums[1][t] = s.sft_logp, sums[2][t] = s.sft_len;
  counts[0][t] = s.kept, counts[1][t] = s.pairs, counts[2][t] = s.correct_pairs, counts[3][t] = s.ranked_groups;
  counts[4][t] = s.top1_correct;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) {
      for (int i = 0; i < 3; ++i) sums[i][t] += sums[i][t + stride];
      for (int i = 0; i < 5; ++i) counts[i][t] += counts[i][t + stride];
    }
    __syncthreads();
  }
  return GroupPartial{sums[0][0], sums[1][0], sums[2][0], counts[0][0], counts[1][0], counts[2][0], counts[3][0],
                      counts[4][0]};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) group_loss_fwd_kernel(const GroupLossArgs<T> a) {
  GroupPartial s = group_partial_zero();
  for (int64_t g = threadIdx.x; g < a.num_groups; g += kThreads) add_partial(s, group_forward(a, g));
  const GroupPartial total = block_sum(s);
  __shared__ T sft;
  if (threadIdx.x == 0) sft = write_group_scalars(a, total);
  __syncthreads();
  const T inv_kept = T(1) / T(total.kept > 0 ? total.kept : 1);
  const T total_len = static_cast<T>(total.sft_len < 1.0 ? 1.0 : total.sft_len);
  for (int64_t g = threadIdx.x; g < a.num_groups; g += kThreads) group_finish(a, g, inv_kept, sft, total_len);
}

template <typename T>
__global__ void group_loss_bwd_kernel(const T* __restrict__ grad_loss, const T* __restrict__ grad,
                                      T* __restrict__ out, int64_t size) {
  const T g = *grad_loss;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size; i += stride) {
    out[i] = g * grad[i];
  }
}

}  // namespace

template <typename T>
cudaError_t launch_group_loss_forward(const GroupLossArgs<T>& args, cudaStream_t stream) {
  group_loss_fwd_kernel<T><<<1, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template cudaError_t launch_group_loss_forward<float>(const GroupLossArgs<float>&, cudaStream_t);
template cudaError_t launch_group_loss_forward<double>(const GroupLossArgs<double>&, cudaStream_t);

template <typename T>
cudaError_t launch_group_loss_backward(const T* grad_loss, const T* grad, T* out, int64_t size, cudaStream_t stream) {
  constexpr int64_t kBackwardThreads = 256;
  constexpr int64_t kMaxBlocks = 1024;
  const int64_t needed = (size + kBackwardThreads - 1) / kBackwardThreads;
  const int64_t blocks = std::min(kMaxBlocks, std::max<int64_t>(1, needed));
  group_loss_bwd_kernel<T><<<static_cast<unsigned>(blocks), kBackwardThreads, 0, stream>>>(grad_loss, grad, out,
                                                                                            size);
  return cudaGetLastError();
}

template cudaError_t launch_group_loss_backward<float>(const float*, const float*, float*, int64_t, cudaStream_t);
template cudaError_t launch_group_loss_backward<double>(const double*, const double*, double*, int64_t,
                                                        cudaStream_t);

}  // namespace dpo_kernels
