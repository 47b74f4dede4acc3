"""Exports of RODIN models: HF safetensors directories, GGUF files (llama.cpp, Ollama, LM Studio),
Ollama Modelfiles, and a verifier that compares an export against its source.

    python -m export.hf      --model DIR --out DIR                 # transformers / hub directory
    python -m export.gguf    --model DIR --quant q4_k_m            # llama.cpp / Ollama / LM Studio
    python -m export.ollama  --gguf FILE.gguf                      # Modelfile next to the GGUF
    python -m export.verify  --model DIR --export PATH             # logits / top-1 / perplexity check
"""
