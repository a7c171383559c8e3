"""Data path: indexed datasets, transforms, tokenization, packing and the weighted mixture loader."""
