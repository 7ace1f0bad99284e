"""Statistic definitions: each a function of tensors, computed on the tensors' device."""
