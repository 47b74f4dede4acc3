"""Throughput of export.quants' K-quantizers against gguf-py's Q8_0 (the reference).

Quantizes the same float32 matrix (weights-like, N(0, 0.02)) with each type and
prints MB/s of float32 input, wall clock with ``--threads`` threads and CPU time
(which is what counts on a shared machine), and the ratio to
``gguf.quants.quantize(x, Q8_0)`` measured in the same run. With llama-cpp-python
installed it also times ggml's own C reference quantizer (single thread) for
context, and projects the time of a rodin-1b Q4_K_M export.

    python -m benchmarks.quants --rows 2048 --cols 2048 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time

import gguf
import numpy as np

from export.quants import quantize, quantized_nbytes, tensor_types

QT = gguf.GGMLQuantizationType


def _time(fn, repeat: int) -> tuple[float, float]:
    """Best wall time and the CPU time of that run."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if wall < best[0]:
            best = (wall, cpu)
    return best


def _ggml_reference():
    """ggml_quantize_chunk from llama-cpp-python's libggml-base, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [
        ctypes.c_void_p
    ]

    def run(x: np.ndarray, qtype: QT) -> np.ndarray:
        out = np.empty(quantized_nbytes(x.shape, qtype), dtype=np.uint8)
        lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out

    return run


def _rodin_1b_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (64000, 2048), "output_norm.weight": (2048,)}
    for i in range(22):
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes[f"blk.{i}.{n}.weight"] = (2048, 2048)
        shapes[f"blk.{i}.ffn_gate.weight"] = shapes[f"blk.{i}.ffn_up.weight"] = (5461, 2048)
        shapes[f"blk.{i}.ffn_down.weight"] = (2048, 5461)
        shapes[f"blk.{i}.attn_norm.weight"] = shapes[f"blk.{i}.ffn_norm.weight"] = (2048,)
    return shapes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048, help="matrix rows (default 2048)")
    p.add_argument("--cols", type=int, default=2048, help="matrix columns, a multiple of 256 (default 2048)")
    p.add_argument("--threads", type=int, default=2, help="threads for export.quants.quantize (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement, best kept (default 3)")
    p.add_argument("--types", default="Q4_K,Q5_K,Q6_K", help="comma-separated types to time (default Q4_K,Q5_K,Q6_K)")
    args = p.parse_args(argv)
    if args.cols % 256:
        p.error(f"--cols {args.cols} is not a multiple of 256")

    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"input: {args.rows}x{args.cols} float32 ({mb:.1f} MB), {os.cpu_count()} CPUs, threads={args.threads}")

    ref_wall, ref_cpu = _time(lambda: gguf.quants.quantize(x, QT.Q8_0), args.repeat)
    ref = mb / ref_wall
    print(f"{'reference gguf Q8_0':28s} {ref:8.1f} MB/s wall  {mb / ref_cpu:8.1f} MB/s cpu")

    ggml = _ggml_reference()
    speeds: dict[QT, float] = {}
    cpu_speeds: dict[QT, float] = {}
    for name in args.types.split(","):
        qtype = QT[name.strip().upper()]
        wall, cpu = _time(lambda: quantize(x, qtype, threads=args.threads), args.repeat)
        speeds[qtype] = mb / wall
        cpu_speeds[qtype] = mb / cpu
        line = (
            f"{'export.quants ' + qtype.name:28s} {mb / wall:8.1f} MB/s wall  {mb / cpu:8.1f} MB/s cpu"
            f"  ratio vs gguf Q8_0: {(mb / wall) / ref:.3f}"
        )
        if ggml is not None:
            c_wall, c_cpu = _time(lambda: ggml(x, qtype), args.repeat)
            line += f"  (ggml C ref, 1 thread: {mb / c_wall:.1f} MB/s wall, {mb / c_cpu:.1f} MB/s cpu)"
        print(line)

    if {QT.Q4_K, QT.Q6_K} <= speeds.keys():
        shapes = _rodin_1b_shapes()
        types = tensor_types(shapes, "q4_k_m", n_layers=22)

        def projected(per_type: dict[QT, float], other: float) -> float:
            # F16/F32 tensors: about as fast as Q8_0 or faster
            return sum(4 * int(np.prod(shapes[n])) / 1e6 / per_type.get(t, other) for n, t in types.items())

        print(f"projected rodin-1b Q4_K_M quantization time at the measured wall speeds: {projected(speeds, ref):.0f} s")
        idle = {t: v * args.threads for t, v in cpu_speeds.items()}
        print(
            f"projected on {args.threads} idle cores (CPU-time speed x threads): "
            f"{projected(idle, mb / ref_cpu * args.threads):.0f} s"
        )


if __name__ == "__main__":
    main()
