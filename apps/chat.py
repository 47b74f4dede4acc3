"""The RODIN chat demo: a Gradio app on a rodin model directory, an HF Llama directory or a GGUF file.

    python -m apps.chat --model runs/sft/final                 # PyTorch backend
    python -m apps.chat --model rodin-1b-f32.gguf              # llama.cpp backend
    python -m apps.chat --model runs/pretrain/final --mode completion

Chat mode (instruct models: the model carries a ChatML template, or `--mode chat`) streams
replies token by token, keeps the multi-turn history, has an editable system prompt, sampling
controls, stop/regenerate/clear and French example prompts. Completion mode (base models)
streams the continuation of a text. When a conversation outgrows the context window, the
oldest turns are dropped (system prompt and newest message kept) and the page says so.

Serving: binds 127.0.0.1 unless `--host` says otherwise, `--share` is opt-in, and a queue with
`--concurrency` parallel generations keeps users' streams apart (see apps/backends.py). The
same functions are exposed as named API endpoints for `gradio_client`:

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    reply, notice = client.predict("Bonjour !", [], api_name="/chat")
    for reply, notice in client.submit("Raconte une histoire.", [], api_name="/chat"): ...
    text, notice = client.predict("Il était une fois", api_name="/complete")

`/chat(message, history, system_prompt, temperature, top_p, top_k, repetition_penalty,
max_new_tokens, seed)` streams (reply so far, notice); history is a list of
{"role": "user"|"assistant", "content": str}. `/complete(prompt, ...)` streams
(continuation so far, notice). Greedy decoding when temperature is 0 (the default).
"""

from __future__ import annotations

import os

# No analytics, version checks or telemetry: the demo must work offline (set before importing gradio).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import gradio as gr  # noqa: E402

from apps.backends import (MODES, Backend, load_backend, resolve_mode, sampling_config,  # noqa: E402
                           start_chat, start_completion)
from rodin.chat import DEFAULT_SYSTEM_PROMPT  # noqa: E402

log = logging.getLogger(__name__)

CONTEXT_NOTICE = "Les plus anciens messages ont été retirés du contexte."
FULL_WINDOW_NOTICE = "La fenêtre de contexte est pleine : la réponse a été interrompue."
EXAMPLES = [
    "Bonjour ! Qui es-tu ?",
    "Explique-moi la photosynthèse simplement.",
    "Écris un court poème sur la pluie à Paris.",
    "Quels sont les avantages du vélo en ville ?",
]
COMPLETION_EXAMPLES = [
    "Il était une fois une princesse qui",
    "La Révolution française a commencé en",
    "Pour installer un paquet sous Debian,",
]


def message_text(content) -> str:
    """The text of a message's content: a string, a Gradio content list or a {"text": ...} part."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or "" if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def history_to_messages(history) -> list[dict]:
    """OpenAI-style or Gradio chat history -> rodin messages (user/assistant text turns only)."""
    messages = []
    for m in history or []:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or m.get("metadata"):
            continue
        messages.append({"role": m["role"], "content": message_text(m.get("content"))})
    return messages


def _notice(dropped: int = 0, finish_reason: str = "", truncated_prompt: int = 0) -> str:
    parts = []
    if dropped:
        parts.append(f"{CONTEXT_NOTICE} ({dropped} message{'s' if dropped > 1 else ''})")
    if truncated_prompt:
        parts.append(f"Le début du texte a été retiré pour tenir dans le contexte ({truncated_prompt} jetons).")
    if finish_reason == "context":
        parts.append(FULL_WINDOW_NOTICE)
    return "\n\n".join(f"⚠️ {p}" for p in parts)


class ChatApp:
    """The demo's generation functions (shared by the UI and the API) and its Gradio page."""

    def __init__(self, backend: Backend, mode: str = "auto", system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 max_new_tokens: int = 256, title: str = "RODIN"):
        self.backend = backend
        self.mode = resolve_mode(mode, backend)
        self.system_prompt = system_prompt
        self.max_new_tokens = max(1, min(max_new_tokens, backend.context_length // 2))
        self.title = title
        self.last_result = None  # GenerationResult of the latest finished reply (benchmarks read it)

    def chat(self, message: str, history: list[dict] | None = None, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             max_new_tokens: int = 256, seed: int = -1) -> Iterator[tuple[str, str]]:
        """Stream the assistant's reply to `message` after `history` ({"role", "content"} turns).

        Yields (reply so far, notice); the notice says when the oldest turns were dropped to fit the context.
        """
        message = message_text(message)
        if not message.strip():
            raise gr.Error("Le message est vide.")
        messages = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
        messages += history_to_messages(history) + [{"role": "user", "content": message}]
        try:
            turn = start_chat(self.backend, messages, int(max_new_tokens),
                              sampling_config(temperature, top_p, top_k, repetition_penalty, seed))
        except ValueError as e:
            log.warning("message rejected: %s", e)
            raise gr.Error("Ce message est trop long pour la fenêtre de contexte du modèle "
                           f"({self.backend.context_length} jetons) : raccourcissez-le ou réduisez "
                           "le nombre maximal de nouveaux jetons.") from e
        yield from self._relay(turn.reply, dropped=turn.dropped)

    def complete(self, prompt: str, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, max_new_tokens: int = 256,
                 seed: int = -1) -> Iterator[tuple[str, str]]:
        """Stream the continuation of `prompt` (no chat template). Yields (continuation so far, notice)."""
        if not prompt:
            raise gr.Error("Le texte est vide.")
        reply = start_completion(self.backend, prompt, int(max_new_tokens),
                                 sampling_config(temperature, top_p, top_k, repetition_penalty, seed))
        yield from self._relay(reply)

    def _relay(self, reply, dropped: int = 0) -> Iterator[tuple[str, str]]:
        notice = _notice(dropped)
        try:
            yield "", notice
            for _ in reply:
                yield reply.text, notice
            res = reply.result
            final = _notice(dropped, res.finish_reason, res.truncated_prompt_tokens)
            self.last_result = res
            if final != notice:
                yield reply.text, final
        except GeneratorExit:  # Gradio closes the generator when the user presses Stop
            log.info("generation stopped by the client after %d characters", len(reply.text))
            raise
        finally:
            reply.close()

    # ---- the page ----------------------------------------------------------------------------

    def _sampling_inputs(self, render: bool = True) -> list[gr.components.Component]:
        ctx = self.backend.context_length
        return [
            gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Température (0 = glouton)", render=render),
            gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", render=render),
            gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = désactivé)", render=render),
            gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Pénalité de répétition", render=render),
            gr.Slider(1, ctx, value=self.max_new_tokens, step=1, label="Nouveaux jetons (maximum)", render=render),
            gr.Number(value=-1, precision=0, label="Graine (-1 = aléatoire)", render=render),
        ]

    def _header(self) -> str:
        b = self.backend
        kind = "conversation" if self.mode == "chat" else "complétion"
        return (f"# {self.title}\nModèle `{b.path.name}` · moteur {b.name} · mode {kind} · "
                f"contexte de {b.context_length} jetons")

    def build(self) -> gr.Blocks:
        with gr.Blocks(title=self.title, fill_height=True) as demo:
            gr.Markdown(self._header())
            if self.mode == "chat":
                self._build_chat()
            else:
                self._build_completion()
            # Clean, documented endpoints for gradio_client (the UI's own events are undocumented).
            gr.api(self.complete, api_name="complete")
            if self.mode == "chat":
                gr.api(self.chat, api_name="chat")
        return demo

    def _build_chat(self) -> None:
        notice = gr.Markdown(render=False, elem_id="context-notice")
        system = gr.Textbox(self.system_prompt, label="Consigne système", lines=2, render=False)
        chatbot = gr.Chatbot(label="RODIN", placeholder="Posez une question en français.", scale=1, height=480,
                             render=False)
        textbox = gr.Textbox(placeholder="Écrivez votre message…", show_label=False, submit_btn="Envoyer",
                             stop_btn="Arrêter", elem_id="chat-input", render=False)
        gr.ChatInterface(
            self.chat, chatbot=chatbot, textbox=textbox,
            additional_inputs=[system, *self._sampling_inputs(render=False)],
            additional_inputs_accordion=gr.Accordion("Consigne système et échantillonnage", open=False, render=False),
            additional_outputs=[notice], examples=[[e] for e in EXAMPLES], run_examples_on_click=True,
            cache_examples=False,
            api_name="chat_ui", api_visibility="undocumented", fill_height=True,
        )
        notice.render()

    def _build_completion(self) -> None:
        prompt = gr.Textbox(label="Début du texte", lines=5, placeholder="Il était une fois…")
        with gr.Row():
            run = gr.Button("Générer", variant="primary")
            stop = gr.Button("Arrêter", variant="stop")
            clear = gr.Button("Effacer")
        output = gr.Textbox(label="Suite générée", lines=10, interactive=False)
        notice = gr.Markdown(elem_id="context-notice")
        with gr.Accordion("Échantillonnage", open=False):
            params = self._sampling_inputs()
        gr.Examples(COMPLETION_EXAMPLES, inputs=[prompt], label="Exemples")
        inputs, outputs = [prompt, *params], [output, notice]
        events = [run.click(self.complete, inputs, outputs, api_name="complete_ui", api_visibility="undocumented"),
                  prompt.submit(self.complete, inputs, outputs, api_name="complete_ui_submit",
                                api_visibility="undocumented")]
        stop.click(None, cancels=events)
        clear.click(lambda: ("", "", ""), None, [prompt, output, notice], api_name="clear_ui",
                    api_visibility="undocumented")


def launch(app: ChatApp, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           concurrency: int = 4, block: bool = True):
    demo = app.build()
    demo.queue(default_concurrency_limit=concurrency)
    demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, show_error=True,
                prevent_thread_lock=not block, quiet=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m apps.chat", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m apps.chat --model runs/sft/final\n"
               "  python -m apps.chat --model rodin-1b-q4_k_m.gguf --port 8080 --concurrency 2\n"
               "  python -m apps.chat --model rodin-llm/rodin-1b --mode completion --host 0.0.0.0")
    p.add_argument("--model", required=True,
                   help="rodin model directory, HF Llama directory, upstream .pt, hub id, or a .gguf file (llama.cpp)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="chat (ChatML) or completion; auto = chat if the model carries a chat template (default)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="initial system prompt (editable in the page)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default reply length limit (default 256)")
    p.add_argument("--device", default="auto",
                   help="PyTorch backend: cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="PyTorch backend: weights dtype (auto = fp32 on CPU, bf16 on GPU)")
    p.add_argument("--n-ctx", type=int, default=0, help="GGUF backend: context size (0 = the model's)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for either backend (default: PyTorch's and llama.cpp's own defaults)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--concurrency", type=int, default=4, help="generations running at once (default 4)")
    p.add_argument("--title", default="RODIN", help="page title")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    backend = load_backend(args.model, device=args.device, dtype=dtype, n_ctx=args.n_ctx, n_threads=args.threads)
    app = ChatApp(backend, args.mode, args.system_prompt, args.max_new_tokens, args.title)
    log.info("%s, mode %s", backend.describe(), app.mode)
    launch(app, args.host, args.port, args.share, args.concurrency)


if __name__ == "__main__":
    main()
