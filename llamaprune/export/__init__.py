"""Export of a checkpoint for other engines: one GGUF file for llama.cpp."""
