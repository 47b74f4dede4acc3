"""Lazy, validated access to the weights of any model the exporters read.

`open_source(path)` accepts our model directory, an HF Llama directory (one or several
`*.safetensors` shards) or an upstream / training `.pt` checkpoint, and returns a
`ModelSource` that reads one tensor at a time (our parameter names, stored dtype), so
an exporter never holds the whole model. The shapes are checked against the model config
before anything is written: a mismatched or truncated input fails up front with the file
and the tensor named.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch


from rodin.checkpoint import check_shapes, inspect_model_dir, load_state_dict, resolve_model_path
from rodin.config import ModelConfig


def _card_metadata(readme: Path) -> dict:
    """license / base_model / datasets from a hub model card's YAML header (simple keys and lists)."""
    if not readme.is_file():
        return {}
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    header = text[3:].split("\n---", 1)[0]
    meta, key = {}, None
    for line in header.splitlines():
        if line.startswith("- ") and key:
            meta.setdefault(key, []).append(line[2:].strip().strip("'\""))
        elif ":" in line and not line.startswith(" "):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip().strip("'\"")
            if value:
                meta[key] = value
    out = {k: meta[k] for k in ("license", "datasets") if k in meta}
    if "base_model" in meta:
        bm = meta["base_model"]
        out["base_model"] = bm[0] if isinstance(bm, list) else bm
    return out


@dataclass
class ModelSource:
    """One model's weights, read tensor by tensor. Use as a context manager."""

    info: ModelInfo
    shapes: dict[str, tuple[int, ...]]  # our names -> shape, in model order
    _getters: dict = field(default_factory=dict, repr=False)  # our name -> () -> tensor
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    _row_getters: dict = field(default_factory=dict, repr=False)  # our name -> (r0, r1) -> rows

    @property
    def cfg(self) -> ModelConfig:
        return self.info.cfg

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` (our naming) as stored, read now."""
        try:
            t = self._getters[name]()
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.info.path}: cannot read tensor {name}: {e}. The file is truncated or "
                             f"corrupt; re-download or re-export it") from e
        if tuple(t.shape) != self.shapes[name]:
            raise ValueError(f"{self.info.path}: tensor {name} has shape {tuple(t.shape)}, expected {self.shapes[name]}")
        return t

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor, read without loading the rest (safetensors slices)."""
        if name not in self._row_getters:
            return self.get(name)[start:stop]
        try:
            t = self._row_getters[name](start, stop)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.info.path}: cannot read tensor {name}: {e}. The file is truncated or "
                             f"corrupt; re-download or re-export it") from e
        return t

    def close(self) -> None:
        self._stack.close()
        self._getters.clear()

    def __enter__(self) -> "ModelSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class _SafetensorsFile:
    """Reads tensors of a .safetensors file with plain positioned reads.

    Not memory-mapped on purpose: pages of a mapped file count in the process's resident
    memory once touched, so streaming a 2.5 GB file through mmap would "use" 2.5 GB.
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        self.f = open(path, "rb")
        head = self.f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes); re-download or re-export it")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file (header of {n} bytes in a "
                             f"{size}-byte file); re-download or re-export it")
        try:
            meta = json.loads(self.f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e}); the file is truncated or corrupt") from e
        meta.pop("__metadata__", None)
        self.base = 8 + n
        self.meta = meta
        end = max((v["data_offsets"][1] for v in meta.values()), default=0)
        if self.base + end > size:
            raise ValueError(f"{path} is truncated: its header needs {self.base + end} bytes but the file has "
                             f"{size}; re-download or re-export it")

    def dtype(self, key: str) -> torch.dtype:
        name = self.meta[key]["dtype"]
        if name not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {key} has dtype {name}; only floating-point weights can be exported")
        return _ST_DTYPES[name]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.meta[key]["shape"])

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or rows [start, stop) of it."""
        shape, dtype = self.shape(key), self.dtype(key)
        row = int(torch.Size(shape[1:]).numel()) * dtype.itemsize
        stop = shape[0] if stop is None or not shape else min(stop, shape[0])
        begin, end = self.meta[key]["data_offsets"]
        if not shape:
            start, stop, row = 0, 1, end - begin
        n = (stop - start) * row
        buf = bytearray(n)
        got = os.preadv(self.f.fileno(), [buf], self.base + begin + start * row) if n else 0
        if got != n:
            raise ValueError(f"{self.path}: tensor {key} is cut short ({got} of {n} bytes); the file is truncated")
        t = torch.frombuffer(buf, dtype=dtype) if n else torch.empty(0, dtype=dtype)
        return t.reshape((stop - start, *shape[1:]) if shape else ())

    def close(self) -> None:
        self.f.close()


def _open_safetensors(files: list[Path], stack: ExitStack, rename) -> tuple[dict, dict, dict, dict]:
    getters, shapes, dtypes, rows = {}, {}, {}, {}
    for f in files:
        st = _SafetensorsFile(f)
        stack.callback(st.close)
        for key in st.meta:
            ours = rename(key, f)
            if ours is None:
                continue
            shapes[ours] = st.shape(key)
            dtypes[ours] = st.dtype(key)
            getters[ours] = (lambda st=st, k=key: st.read(k))
            if len(shapes[ours]) == 2:
                rows[ours] = (lambda r0, r1, st=st, k=key: st.read(k, r0, r1))
    return getters, shapes, dtypes, rows


def _open_training_checkpoint(path: Path, config: ModelConfig | None, stack: ExitStack) -> ModelSource:
    """A training run / DCP checkpoint: its weights go through `training.checkpointing.export_checkpoint`
    into a temporary model directory (removed on close), kept in the trained dtype."""
    import shutil
    import tempfile

    from training.checkpointing import export_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="rodin-export-ckpt-"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    model_dir = export_checkpoint(path, tmp / "model", dtype=None)
    src = open_source(model_dir, config)
    stack.enter_context(src._stack.pop_all())  # its files close before the directory is removed
    src._stack = stack
    return src


def open_source(path_or_id: str | os.PathLike, config: ModelConfig | None = None) -> ModelSource:
    """Open our model directory, an HF Llama directory or a `.pt` checkpoint for lazy reading."""
    path = resolve_model_path(path_or_id)
    stack = ExitStack()
    try:
        if path.is_file():
            # A pickle checkpoint: torch.load(mmap=True, weights_only=True) maps it without reading it.
            sd, info = load_state_dict(path, config)
            shapes = check_shapes(path, info.cfg, {k: tuple(v.shape) for k, v in sd.items()})
            return ModelSource(info, shapes, {k: (lambda t=sd[k]: t) for k in shapes}, stack,
                               {k: sd[k].dtype for k in shapes})
        if (path / "checkpoint.json").is_file() or (path / "checkpoints").is_dir():
            return _open_training_checkpoint(path, config, stack)
        info, files, rename = inspect_model_dir(path, config)
        getters, shapes, dtypes, rows = _open_safetensors(files, stack, rename)
        if info.source == "hf":
            info.metadata = _card_metadata(path / "README.md")
        order = check_shapes(path, info.cfg, shapes)
        return ModelSource(info, order, getters, stack, dtypes, rows)
    except BaseException:
        stack.close()
        raise
