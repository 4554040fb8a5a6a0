"""Numerical checks: pure functions, tensors in, Findings out, no I/O."""
