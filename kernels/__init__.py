"""Triton kernels and their plain-torch references; tensors in, tensors out."""
