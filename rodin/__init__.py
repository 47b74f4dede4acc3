"""rodin: the core library of the RODIN French language models.

Model config and presets, the LLaMA-style model with its KV cache, the SentencePiece
tokenizer, the ChatML chat format, generation and weight loading/saving. Everything
else in the project (training/, export/, apps/) builds on this package; nothing here
imports them.
"""

__version__ = "0.1.0"
