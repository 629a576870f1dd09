"""Inference: sampling with a KV cache (generate), the GPU decode path (decode), the chat template (chat)."""
