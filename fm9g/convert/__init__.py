"""Checkpoint conversion between bmtrain-named `.pt` files and Hugging Face directories."""
