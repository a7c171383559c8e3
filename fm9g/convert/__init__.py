"""Checkpoint conversion between bmtrain-named `.pt` files and Hugging Face directories.

keys.py (the one name table, both directions), hf_config.py (HF config.json <-> FM9GConfig, one
table), files.py (HF folders, streamed safetensors, checkpoint files), peft.py (PEFT adapters and
the LoRA checkpoints an export merges), hf.py (`hf_to_bmt`, `bmt_to_hf`, `load_pretrained`).
"""
