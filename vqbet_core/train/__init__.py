"""Offline training of VQ-BeT / BeT from zarr datasets (phase 1 tokenizer, phase 2 GPT)."""
