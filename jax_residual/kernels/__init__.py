"""Compute kernels below the model: attention."""
