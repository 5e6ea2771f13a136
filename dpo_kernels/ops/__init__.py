"""One module per op: Triton kernels -> launcher -> autograd.Function -> typed functional API."""
