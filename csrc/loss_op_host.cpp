// The argument checks shared by the loss ops' host paths (loss_op_host.h).
#include "loss_op_host.h"

namespace dpo_kernels {

at::Tensor vector_like(const std::optional<at::Tensor>& t, const at::Tensor& like, at::ScalarType dtype,
                       const char* op, const char* like_name, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->sizes() == like.sizes(), op, ": ", name, " has shape ", t->sizes(), " but ", like_name, " has ",
              like.sizes());
  TORCH_CHECK(t->device() == like.device(), op, ": ", name, " is on ", t->device(), " but ", like_name, " is on ",
              like.device());
  TORCH_CHECK(t->scalar_type() == dtype, op, ": ", name, " has dtype ", t->scalar_type(), " but needs ", dtype,
              "; the Python wrapper casts it");
  return t->contiguous();
}

at::Tensor upstream_grad(const at::Tensor& grad_loss, at::ScalarType dtype, const char* op) {
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must have one element, got shape ", grad_loss.sizes());
  return grad_loss.scalar_type() == dtype ? grad_loss.contiguous() : grad_loss.to(dtype);
}

}  // namespace dpo_kernels
