"""The Llama model (llama) and its layers (layers: Module, Parameter, Linear, Embedding, RMSNorm, Dropout)."""
