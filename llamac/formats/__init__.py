"""Model formats: the Hugging Face layout (hf), its import (hf_import), and the HF / GGUF / native exports."""
