"""Loading and saving weights: our model directories, HF Llama directories, upstream `.pt` files.

Our model directory is self-contained:
    model.safetensors    weights (tied lm_head stored once, as tok_emb.weight)
    model_config.json    {"format": "rodin/1", "model": ModelConfig fields,
                          "chat_template": Jinja ChatML or null, "metadata": {...}}
    tokenizer.model      SentencePiece model

`load_model` also reads an HF `LlamaForCausalLM` directory (e.g. the released
`rodin-llm/rodin-1b`, or its hub id when online) and an upstream RODIN `.pt` checkpoint.
Models are built on the meta device and the loaded tensors assigned, so a 1.24B model never
exists twice in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rodin.config import PRESETS, ModelConfig
from rodin.model import Transformer
from rodin.tokenizer import TOKENIZER_FILE, Tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
FORMAT = "rodin/1"

# The one map between our parameter names and HF Llama's ({i} = layer index).
HF_KEY_MAP = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.ffn.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.ffn.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.ffn.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _map_key(key: str, table: dict[str, str]) -> str | None:
    layer = re.search(r"\.(\d+)\.", key)
    generic = key.replace(f".{layer.group(1)}.", ".{i}.", 1) if layer else key
    target = table.get(generic)
    return None if target is None else target.replace("{i}", layer.group(1) if layer else "")


def to_hf_name(name: str) -> str:
    mapped = _map_key(name, HF_KEY_MAP)
    if mapped is None:
        raise KeyError(f"no HF name for parameter {name!r}")
    return mapped


def from_hf_name(name: str) -> str | None:
    return _map_key(name, {v: k for k, v in HF_KEY_MAP.items()})


def to_hf_config(cfg: ModelConfig, *, torch_dtype: str = "bfloat16", bos_id: int = 2, eos_id: int = 3,
                 pad_id: int = 0) -> dict:
    """The `config.json` of an equivalent HF LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig of an HF Llama config; refuses what our model cannot represent."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}; only 'llama' checkpoints are supported")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ValueError(f"{source}: RoPE scaling {scaling!r} is not supported by the RODIN model")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{source}: biases are not supported by the RODIN model")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: activation {hf['hidden_act']!r} is not supported (SwiGLU/silu only)")
    cfg = ModelConfig(
        name=hf.get("_name_or_path") or "hf",
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise ValueError(f"{source}: head_dim {hf['head_dim']} differs from hidden_size / heads = {cfg.head_dim}")
    return cfg


@dataclass
class ModelInfo:
    """What was loaded next to the weights."""

    cfg: ModelConfig
    source: str  # "rodin", "hf" or "upstream"
    path: Path
    tokenizer_path: Path | None
    chat_template: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return self.chat_template is not None


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX, where PyTorch's bf16 kernels run natively."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device | str, stored: torch.dtype | None = None) -> torch.dtype:
    """Runtime dtype that never changes results beyond the stored precision.

    GPU: bf16. CPU: bf16 weights stay bf16 where the CPU has native bf16 kernels (decoding is
    memory-bound, so half the bytes is twice the speed: measured 8.6 against 4.3 tokens/s at
    the rodin-1b shape on an AVX512-BF16 EPYC); everything else runs in fp32, an exact upcast
    (PyTorch's emulated bf16 kernels are slower than fp32 on CPUs without native support).
    """
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if stored == torch.bfloat16 and cpu_has_native_bf16() else torch.float32


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-export or re-download the model") from e


def _load_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {f}: {e}. The file is truncated or corrupt; "
                             f"re-download or re-export it") from e
    return sd


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for `cfg` in model order (lm_head only when untied)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_shapes(source: Path, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Refuse stored tensors that do not match `cfg` (naming the file and the tensor);
    returns the expected shapes in model order. A tied lm_head in `shapes` is ignored."""
    expected = expected_shapes(cfg)
    if cfg.tie_embeddings:
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model config ({cfg.name}): missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        if tuple(shapes[k]) != shape:
            raise ValueError(f"{source}: tensor {k} has shape {tuple(shapes[k])} but the config ({cfg.name}) "
                             f"expects {shape}; the config and the weights do not belong together")
    return expected


def _build(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: Path, device, dtype) -> Transformer:
    check_shapes(source, cfg, {k: tuple(v.shape) for k, v in sd.items()})
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in sd.items()}


_UPSTREAM_CFG_KEYS = {
    "dim": ("dim", "d_model", "hidden_size", "n_embd"),
    "n_heads": ("n_heads", "n_head", "num_heads", "num_attention_heads"),
    "n_kv_heads": ("n_kv_heads", "n_kv_head", "num_key_value_heads"),
    "context_length": ("context_length", "max_seq_len", "ctx_len", "seq_len", "block_size", "max_position_embeddings"),
    "rope_theta": ("rope_theta", "theta", "rope_base"),
    "norm_eps": ("norm_eps", "rms_norm_eps", "eps"),
}


def _upstream_config(sd: dict[str, torch.Tensor], raw_cfg: dict, source: Path) -> ModelConfig:
    vocab, dim = sd["tok_emb.weight"].shape
    n_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    ffn = sd["blocks.0.ffn.w1.weight"].shape[0]
    found = {f: next((raw_cfg[k] for k in keys if k in raw_cfg), None) for f, keys in _UPSTREAM_CFG_KEYS.items()}
    preset = next((p for p in PRESETS.values() if (p.dim, p.n_layers, p.ffn_dim) == (dim, n_layers, ffn)), None)
    n_heads = found["n_heads"] or (preset.n_heads if preset else None)
    if n_heads is None:
        raise ValueError(f"{source}: the checkpoint's cfg does not give the number of heads and its shape "
                         f"(dim {dim}, {n_layers} layers, ffn {ffn}) matches no preset; pass config=ModelConfig(...)")
    head_dim = dim // n_heads
    return ModelConfig(
        name=preset.name if preset else source.stem, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=found["n_kv_heads"] or sd["blocks.0.attn.wk.weight"].shape[0] // head_dim, ffn_dim=ffn,
        vocab_size=vocab, context_length=found["context_length"] or (preset.context_length if preset else 2048),
        rope_theta=float(found["rope_theta"] or 10000.0), norm_eps=float(found["norm_eps"] or 1e-5),
        tie_embeddings="lm_head.weight" not in sd or sd["lm_head.weight"].data_ptr() == sd["tok_emb.weight"].data_ptr()
        or torch.equal(sd["lm_head.weight"], sd["tok_emb.weight"]),
    )


def resolve_model_path(path_or_id: str | os.PathLike) -> Path:
    """A local path as is; `owner/name` that does not exist locally is fetched from the HF hub."""
    path = Path(path_or_id)
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_id)) and not str(path_or_id).startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(path_or_id), allow_patterns=[
                "*.json", "*.safetensors", "tokenizer.model", "*.jinja", "README.md"]))
        except Exception as e:
            raise FileNotFoundError(f"{path_or_id} is not a local path and could not be downloaded from the "
                                    f"Hugging Face hub ({type(e).__name__}: {e})") from e
    raise FileNotFoundError(f"model not found: {path} (expected a rodin model directory, an HF Llama directory, "
                            f"an upstream .pt file or a hub id such as rodin-llm/rodin-1b)")


def load_state_dict(path_or_id: str | os.PathLike, config: ModelConfig | None = None) -> tuple[dict[str, torch.Tensor], ModelInfo]:
    """The weights (our parameter names, stored dtype) and ModelInfo of any supported source."""
    path = resolve_model_path(path_or_id)
    if path.is_file():
        if path.suffix not in (".pt", ".pth", ".bin"):
            raise ValueError(f"{path}: unsupported file type; expected a model directory or an upstream .pt checkpoint")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"cannot load {path} with torch.load(weights_only=True): {e}. "
                             f"The file is truncated, corrupt or holds more than tensors") from e
        raw_cfg = obj.get("cfg") or obj.get("config") or {} if isinstance(obj, dict) and "model" in obj else {}
        sd = _strip_prefixes(obj["model"] if isinstance(obj, dict) and "model" in obj else obj)
        if "tok_emb.weight" not in sd:
            raise ValueError(f"{path}: no 'tok_emb.weight' tensor; this is not an upstream RODIN checkpoint")
        cfg = config or _upstream_config(sd, raw_cfg if isinstance(raw_cfg, dict) else {}, path)
        tok = path.parent / TOKENIZER_FILE
        return sd, ModelInfo(cfg, "upstream", path, tok if tok.is_file() else None)
    info, files, rename = inspect_model_dir(path, config)
    sd = {}
    for f in files:
        for k, v in _load_safetensors([f]).items():
            ours = rename(k, f)
            if ours is not None:
                sd[ours] = v
    return sd, info


def inspect_model_dir(path: Path, config: ModelConfig | None = None) -> tuple[ModelInfo, list[Path], Callable[[str, Path], str | None]]:
    """What a model directory (ours or HF Llama) holds, without reading the weights: its
    ModelInfo, its safetensors files and `rename(stored_name, file)`, which gives our parameter
    name (None for tensors to skip) or raises on a tensor that does not belong to the model."""
    if (path / CONFIG_FILE).is_file():
        meta = _read_json(path / CONFIG_FILE)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path / CONFIG_FILE}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
        cfg = config or ModelConfig.from_dict(meta["model"])
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path / WEIGHTS_FILE} is missing; the model directory is incomplete")
        tok = path / TOKENIZER_FILE
        info = ModelInfo(cfg, "rodin", path, tok if tok.is_file() else None, meta.get("chat_template"),
                         meta.get("metadata", {}))
        return info, [path / WEIGHTS_FILE], lambda key, f: key
    if (path / "config.json").is_file():
        hf = _read_json(path / "config.json")
        cfg = config or from_hf_config(hf, str(path / "config.json"))
        if config is None and cfg.name == "hf":
            cfg = dataclasses.replace(cfg, name=path.name)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors weights next to config.json "
                                    f"(PyTorch .bin HF checkpoints are not loaded: they are pickles)")

        def rename(key: str, f: Path) -> str | None:
            ours = from_hf_name(key)
            if ours is None and not key.endswith("rotary_emb.inv_freq"):
                raise ValueError(f"{f}: unexpected tensor {key!r} for a Llama model")
            return ours

        template = None
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            template = _read_json(tc).get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        tok = path / TOKENIZER_FILE
        return ModelInfo(cfg, "hf", path, tok if tok.is_file() else None, template), files, rename
    raise FileNotFoundError(f"{path}: neither {CONFIG_FILE} (rodin) nor config.json (HF) found; not a model directory")


def load_model(path_or_id: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               config: ModelConfig | None = None) -> tuple[Transformer, ModelInfo]:
    """Load any supported checkpoint as a `Transformer` in eval mode on `device`.

    dtype None picks `default_dtype(device, stored dtype)`: bf16 on GPU; on CPU bf16 for bf16
    weights where the CPU has native bf16, fp32 otherwise.
    """
    sd, info = load_state_dict(path_or_id, config)
    stored = sd["tok_emb.weight"].dtype
    model = _build(info.cfg, sd, info.path, device, dtype or default_dtype(device, stored))
    return model, info


def load_tokenizer(info_or_path: ModelInfo | str | os.PathLike) -> Tokenizer:
    path = info_or_path.tokenizer_path if isinstance(info_or_path, ModelInfo) else Path(info_or_path)
    if path is None:
        raise FileNotFoundError(f"no {TOKENIZER_FILE} next to {info_or_path.path}; pass the tokenizer explicitly")
    return Tokenizer(path)


def temp_dir_beside(out_dir: Path) -> Path:
    """A new temporary directory next to `out_dir` (same filesystem, so it can be renamed into place)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)  # mkdtemp creates 0700; give the usual directory mode
    return tmp


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a completed directory into place, replacing `out_dir` if it exists."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model(model: Transformer, out_dir: str | os.PathLike, *, tokenizer: Tokenizer | str | os.PathLike | None = None,
               chat_template: str | None = None, metadata: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a self-contained model directory atomically (a temporary directory renamed at the end)."""
    out_dir = Path(out_dir)
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in sd.items()}
    tmp = temp_dir_beside(out_dir)
    try:
        save_file(sd, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        meta = {"format": FORMAT, "model": model.cfg.to_dict(), "chat_template": chat_template,
                "metadata": metadata or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        if tokenizer is not None:
            src = tokenizer.path if isinstance(tokenizer, Tokenizer) else Path(tokenizer)
            if src.is_dir():
                src = src / TOKENIZER_FILE
            shutil.copyfile(src, tmp / TOKENIZER_FILE)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
