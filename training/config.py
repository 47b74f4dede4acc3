"""Run configuration: small dataclasses, TOML recipes and command-line overrides.

A run is configured in three layers, later ones winning:
    1. the dataclass defaults below,
    2. a recipe (`--recipe rodin-1b-b200` reads `training/recipes/rodin-1b-b200.toml`, or
       `--recipe path/to/file.toml`; a recipe may name a `base` recipe it extends),
    3. overrides: per-field flags (`--optim.lr 1e-4`) and `--set optim.lr=1e-4`.
The resolved configuration is written to `<out_dir>/config.json` by the trainer.
Field help strings (the `help=` below) are the `--help` text.

The model shape is NOT configured here: `model = "rodin-1b"` names a preset of
`rodin.config` (one definition of every shape).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPES_DIR = Path(__file__).parent / "recipes"


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help, "section": True})


@dataclass
class OptimConfig:
    lr: float = opt(3e-4, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "cosine decay floor, as a fraction of the peak LR")
    warmup_steps: int = opt(2000, "linear warmup steps (from 0 to the peak LR)")
    schedule: str = opt("cosine", "LR schedule after warmup: cosine | constant | linear")
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to 2-D+ tensors only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global grad norm to this value (0 = off)")


@dataclass
class TrainConfig:
    max_steps: int = opt(478_000, "optimizer steps of the whole run (the schedule's length)")
    global_batch_size: int = opt(32, "sequences per optimizer step, over all ranks and micro-steps")
    micro_batch_size: int = opt(32, "sequences per forward pass per rank; gradient accumulation = "
                                    "global_batch_size / (micro_batch_size x world size)")
    seq_len: int = opt(0, "tokens per training sequence; 0 = the model's context length")


@dataclass
class EvalConfig:
    every: int = opt(2000, "validation every N steps (0 = only at the end)")
    max_batches: int = opt(50, "validation micro-batches per evaluation, over all ranks")


@dataclass
class CheckpointConfig:
    every: int = opt(1000, "save a resumable checkpoint every N steps (0 = only at preemption/end)")
    keep: int = opt(3, "complete checkpoints kept (older ones are deleted)")
    export_every: int = opt(0, "also write a rodin model directory every N steps (0 = only the final one)")
    export_final: bool = opt(True, "write the final weights to <out_dir>/final as a rodin model directory")
    export_dtype: str = opt("bfloat16", "dtype of exported weights: bfloat16 | float32")
    resume: bool = opt(True, "resume from the newest complete checkpoint in <out_dir>/checkpoints")


@dataclass
class LogConfig:
    every: int = opt(10, "print and record training metrics every N steps")
    tensorboard: bool = opt(True, "write TensorBoard events to <out_dir>/tensorboard")
    plot: bool = opt(True, "write <out_dir>/loss.png at the end")
    progress: str = opt("auto", "tqdm progress bar: auto (when stdout is a terminal) | on | off")


@dataclass
class SystemConfig:
    device: str = opt("auto", "auto | cpu | cuda")
    dtype: str = opt("auto", "compute dtype (autocast; master weights stay fp32): auto (bf16 on CUDA and on "
                                "CPUs with native bf16 matmuls such as AVX512-BF16/AMX, else fp32) | bfloat16 | float32")
    compile: str = opt("auto", "torch.compile: auto (on for CUDA) | off | block (per block) | model (whole model)")
    parallel: str = opt("auto", "multi-process strategy: auto (fsdp when world size > 1) | fsdp | ddp | none")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in backward (saves memory)")
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms (bitwise-reproducible resume)")
    num_threads: int = opt(0, "CPU threads per process (0 = PyTorch's default)")
    dist_timeout_s: int = opt(1800, "timeout of collective operations, seconds")


@dataclass
class HealthConfig:
    policy: str = opt("skip", "on NaN/inf loss or grad norm, or a grad-norm spike: skip (drop the batch) | "
                              "rollback (reload the last checkpoint, continue past the bad data) | stop")
    spike_factor: float = opt(0.0, "treat grad norm > spike_factor x its running mean as a spike (0 = off)")
    spike_warmup_steps: int = opt(100, "steps before the spike detector is armed")
    max_consecutive: int = opt(5, "give up (exit with an error) after this many bad steps in a row")


@dataclass
class DebugConfig:
    """Fault injection for tests; leave at 0 in real runs."""
    nan_at_step: int = opt(0, "inject a NaN into the loss at this step (tests the health guard)")
    sleep_per_step: float = opt(0.0, "sleep this many seconds after each step (lets tests interrupt a run)")
    sigkill_at_step: int = opt(0, "kill -9 this process right after this step (tests exact resume)")
    sigkill_in_checkpoint_at_step: int = opt(0, "kill -9 while writing the checkpoint of this step")


@dataclass
class TrainerConfig:
    """Everything the shared loop needs; pretraining and SFT extend it with model and data."""
    out_dir: str = opt("runs/rodin", "run directory: checkpoints, logs, config.json, final model")
    seed: int = opt(1234, "seed of the weight init and the data order")
    tokenizer: str = opt("", "tokenizer.model (or its directory) copied into exported models; "
                             "default: the one in the data directory, if any")
    optim: OptimConfig = section(OptimConfig, "optimizer and LR schedule")
    train: TrainConfig = section(TrainConfig, "batch and length of the run")
    eval: EvalConfig = section(EvalConfig, "validation")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints and exports")
    log: LogConfig = section(LogConfig, "logging")
    system: SystemConfig = section(SystemConfig, "devices, precision, compilation, parallelism")
    health: HealthConfig = section(HealthConfig, "NaN and spike guard")
    debug: DebugConfig = section(DebugConfig, "fault injection (tests)")


# --------------------------------------------------------------------------- generic machinery

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("section"))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _convert(value: Any, typ: Any, key: str) -> Any:
    """Coerce a TOML value or a command-line string to the field's type."""
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = args[0]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            if typ is int and isinstance(value, str):
                value = value.replace("_", "")
                return int(float(value)) if "e" in value.lower() else int(value)
            out = typ(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _set(cfg: Any, dotted: str, value: Any, source: str) -> None:
    obj, parts = cfg, dotted.split(".")
    for i, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ValueError(f"{source}: unknown setting {dotted!r} ({name!r} is not a field of {where}; "
                             f"known: {', '.join(fields)})")
        f = fields[name]
        if i == len(parts) - 1:
            if _is_section(f):
                if not isinstance(value, dict):
                    raise ValueError(f"{source}: {dotted} is a section; give a table or set its fields")
                for k, v in value.items():
                    _set(cfg, f"{dotted}.{k}", v, source)
            else:
                setattr(obj, name, _convert(value, _hints(type(obj))[name], f"{source}: {dotted}"))
        else:
            if not _is_section(f):
                raise ValueError(f"{source}: {'.'.join(parts[:i + 1])} is not a section")
            obj = getattr(obj, name)


def resolve_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {p} not found")
        return p
    p = RECIPES_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.toml")))
        raise FileNotFoundError(f"unknown recipe {name_or_path!r}; built-in recipes: {known} (or give a .toml path)")
    return p


def read_recipe(name_or_path: str, _seen: tuple = ()) -> dict:
    """The recipe as a dict, with its `base` chain merged (base first)."""
    path = resolve_recipe(name_or_path)
    if path.resolve() in _seen:
        raise ValueError(f"recipe {path}: circular 'base' chain")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"recipe {path} is not valid TOML: {e}") from e
    base = data.pop("base", None)
    if base is None:
        return data
    if base.endswith(".toml") and not Path(base).is_absolute():
        base = str(path.parent / base)  # a file path is relative to the recipe that names it
    merged = read_recipe(base, _seen + (path.resolve(),))
    return _merge(merged, data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type, data: dict, source: str = "config") -> Any:
    cfg = cls()
    for k, v in data.items():
        _set(cfg, k, v, source)
    return cfg


def _walk(cls: type, prefix: str = ""):
    """(dotted name, field, type) of every leaf field."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if _is_section(f):
            yield from _walk(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def build_parser(cls: type, description: str, epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="built-in recipe name (training/recipes/NAME.toml) or a .toml path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f, typ in _walk(cls):
        sec = name.split(".")[0] if "." in name else None
        if sec is None:
            group = parser
        else:
            if sec not in groups:
                sec_field = next(x for x in dataclasses.fields(cls) if x.name == sec)
                groups[sec] = parser.add_argument_group(sec, sec_field.metadata.get("help"))
            group = groups[sec]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tname = getattr(typ, "__name__", str(typ))
        group.add_argument(f"--{name}", dest=name, default=None, metavar=tname.upper(),
                           help=f"{f.metadata.get('help', '')} (default: {default!r})")
    return parser


def parse_config(cls: type, argv: list[str] | None = None, description: str = "", epilog: str = "",
                 parser: argparse.ArgumentParser | None = None) -> tuple[Any, argparse.Namespace]:
    """Defaults < recipe < per-field flags < --set. Returns (config, parsed args)."""
    parser = parser or build_parser(cls, description, epilog)
    args = parser.parse_args(argv)
    cfg = cls()
    if args.recipe:
        cfg = from_dict(cls, read_recipe(args.recipe), source=f"recipe {args.recipe}")
    for name, _, _ in _walk(cls):
        value = getattr(args, name, None)
        if value is not None:
            _set(cfg, name, value, f"--{name}")
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
        key, value = item.split("=", 1)
        try:
            _set(cfg, key.strip(), value.strip(), f"--set {item}")
        except ValueError as e:
            parser.error(str(e))
    return cfg, args


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- pretraining

@dataclass
class DataConfig:
    path: str = opt("data/tokens", "directory holding train.bin and val.bin (flat uint16/uint32 token "
                                   "streams, documents separated by EOS; meta.json may give the dtype)")


@dataclass
class PretrainConfig(TrainerConfig):
    model: str = opt("rodin-1b", "model preset of rodin.config (rodin-1b, rodin-410m, rodin-tiny, rodin-debug); "
                                 "its vocab_size is replaced by the tokenizer's when they differ")
    data: DataConfig = section(DataConfig, "token shards")
