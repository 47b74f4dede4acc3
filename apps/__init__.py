"""Applications on the rodin core: the Gradio chat demo (`python -m apps.chat`), the terminal
chat/completion CLI (`python -m apps.generate`), their shared backends (`apps.backends`), and the
FrenchBench evaluation."""
