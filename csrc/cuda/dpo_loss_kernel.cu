// The DPO loss on the GPU. Each thread strides over pairs keeping double partial sums, and shared-memory trees
// reduce them in a fixed order, so the result is bitwise reproducible for any B. Up to kSingleBlockMaxBatch pairs
// (training batch sizes, where the op is launch-bound) one block does everything in one launch. Above it, one
// thread per pair would leave a single block looping hundreds of times at memory latency (B = 65536: ~128 dependent
// iterations per thread), so a grid of blocks writes per-block partial sums and a one-block launch reduces them in
// block order. The backward is one grid-stride launch scaling the saved coefficients.
#include "dpo_loss_kernel.h"

#include <algorithm>

namespace dpo_kernels {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kSingleBlockMaxBatch = 8 * kThreads;
constexpr int64_t kPairsPerThread = 4;  // large batches: about this many pairs per thread
constexpr int64_t kMaxPartialBlocks = 1024;

struct Partial {
  double loss;
  double margin;
  long long correct;
};

template <typename T>
__device__ Partial pairs_partial(const DpoLossArgs<T>& a, int64_t first, int64_t stride) {
  Partial s{0.0, 0.0, 0};
  for (int64_t p = first; p < a.batch; p += stride) {
    bool correct;
    T margin;
    s.loss += static_cast<double>(dpo_pair(a, p, correct, margin));
    s.margin += static_cast<double>(margin);
    s.correct += correct ? 1 : 0;
  }
  return s;
}

// Fixed-order tree over the block's threads; the sum is valid in thread 0. Every thread must call it.
__device__ Partial block_sum(Partial s) {
  __shared__ double loss_sums[kThreads];
  __shared__ double margin_sums[kThreads];
  __shared__ long long correct_counts[kThreads];
  loss_sums[threadIdx.x] = s.loss;
  margin_sums[threadIdx.x] = s.margin;
  correct_counts[threadIdx.x] = s.correct;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      loss_sums[threadIdx.x] += loss_sums[threadIdx.x + stride];
      margin_sums[threadIdx.x] += margin_sums[threadIdx.x + stride];
      correct_counts[threadIdx.x] += correct_counts[threadIdx.x + stride];
    }
    __syncthreads();
  }
  return Partial{loss_sums[0], margin_sums[0], correct_counts[0]};
}

template <typename T>
__device__ void write_means(const DpoLossArgs<T>& a, const Partial& total) {
  const double b = static_cast<double>(a.batch);
  *a.loss = static_cast<T>(total.loss / b);
  *a.reward_margin = static_cast<T>(total.margin / b);
  *a.reward_accuracy = static_cast<T>(static_cast<double>(total.correct) / b);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dpo_loss_fwd_kernel(const DpoLossArgs<T> a) {
  const Partial total = block_sum(pairs_partial(a, threadIdx.x, kThreads));
  if (threadIdx.x == 0) write_means(a, total);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dpo_loss_fwd_partial_kernel(const DpoLossArgs<T> a,
                                                                        Partial* __restrict__ partials) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const Partial s = block_sum(pairs_partial(a, first, static_cast<int64_t>(gridDim.x) * kThreads));
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dpo_loss_fwd_finish_kernel(const DpoLossArgs<T> a,
                                                                       const Partial* __restrict__ partials,
                                                                       int num_partials) {
  Partial s{0.0, 0.0, 0};
  for (int i = threadIdx.x; i < num_partials; i += kThreads) {
    s.loss += partials[i].loss;
    s.margin += partials[i].margin;
    s.correct += partials[i].correct;
  }
  const Partial total = block_sum(s);
  if (threadIdx.x == 0) write_means(a, total);
}

int64_t partial_blocks(int64_t batch) {
  if (batch <= kSingleBlockMaxBatch) return 0;
  const int64_t per_block = kThreads * kPairsPerThread;
  return std::min(kMaxPartialBlocks, (batch + per_block - 1) / per_block);
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
  const int64_t needed = (batch + kBackwardThreads - 1) / kBackwardThreads;
  const int64_t blocks = std::min(kMaxBlocks, std::max<int64_t>(1, needed));
  dpo_loss_bwd_kernel<T><<<static_cast<unsigned>(blocks), kBackwardThreads, 0, stream>>>(
      grad_loss, grad_chosen, grad_rejected, out_chosen, out_rejected, batch);
  return cudaGetLastError();
}

template cudaError_t launch_dpo_loss_backward<float>(const float*, const float*, const float*, float*, float*,
                                                     int64_t, cudaStream_t);
template cudaError_t launch_dpo_loss_backward<double>(const double*, const double*, const double*, double*, double*,
                                                      int64_t, cudaStream_t);

size_t dpo_loss_forward_workspace_bytes(int64_t batch) {
  return static_cast<size_t>(partial_blocks(batch)) * sizeof(Partial);
}

template <typename T>
cudaError_t launch_dpo_loss_forward(const DpoLossArgs<T>& args, void* workspace, cudaStream_t stream) {
  const int64_t blocks = partial_blocks(args.batch);
  if (blocks == 0) {
    dpo_loss_fwd_kernel<T><<<1, kThreads, 0, stream>>>(args);
    return cudaGetLastError();
  }
  Partial* partials = static_cast<Partial*>(workspace);
  dpo_loss_fwd_partial_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args, partials);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  dpo_loss_fwd_finish_kernel<T><<<1, kThreads, 0, stream>>>(args, partials, static_cast<int>(blocks));
  return cudaGetLastError();
}

template cudaError_t launch_dpo_loss_forward<float>(const DpoLossArgs<float>&, void*, cudaStream_t);
template cudaError_t launch_dpo_loss_forward<double>(const DpoLossArgs<double>&, void*, cudaStream_t);

}  // namespace dpo_kernels
