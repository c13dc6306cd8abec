"""Sparse dictionaries (sae-lens objects): attention-output SAEs, MLP transcoders, evaluation, storage, steps."""
