"""Interoperation with other tools' model formats: Hugging Face transformers and GGUF (llama.cpp)."""
