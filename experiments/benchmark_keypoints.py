"""Benchmark: paper-2 building blocks — coordinate transfer and (compact) bilinear pooling.

Measures, on the machine it runs on (functions `jax.jit`-ed, one warm-up call, then the median
of ``repeats`` timed calls with ``block_until_ready``; wall and process-CPU seconds):

* ``coordinate_transfer``: `fgloc.localize.coordinate_transfer.coordinate_transfer` (a vmapped
  gather over images and parts) on a ``(B, h, w, C)`` map with P parts and an ``n × n`` average
  window, forward and forward + backward (the gradient w.r.t. the features), against a Python
  loop over images and parts of eager JAX slices and means (the straightforward port of a Caffe
  layer); the two are checked to give the same numbers before they are timed;
* ``bilinear``: the pooling layer as used, sketch → sum over positions → signed sqrt → L2
  normalisation (`fgloc.models.bilinear`), for full bilinear pooling (``C²`` dims), Random
  Maclaurin and Tensor Sketch (count sketch by scatter-add ``segment`` or by a dense ``(C, d)``
  matrix ``dense``) at dimension ``d``: forward and forward + backward (w.r.t. the input map),
  XLA's compiled memory statistics (``memory_analysis``: argument, output and temporary bytes),
  and the host's peak resident memory above a baseline, measured in a fresh subprocess per
  method (``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``), so
  that one method's freed buffers cannot hide another's; plus the relative error of the sketch's
  kernel ``⟨φ(X_b), φ(X_b')⟩`` against the exact ``Σ_{n,m} ⟨x_n, y_m⟩²`` over image pairs, on
  the benchmark's random post-ReLU features (before signed sqrt).

Run (the full setting: B = 16, 14 × 14 × 512, P = 15, n = 3, d = 8192; numbers in the lead's
BENCHMARKS.md and this helper's report)::

    nice -n 10 python -m experiments.benchmark_keypoints --out /tmp/benchmark_keypoints.json
    python -m experiments.benchmark_keypoints --smoke --out /tmp/bk_smoke.json   # seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fgloc.localize.coordinate_transfer import coordinate_transfer, window_starts
from fgloc.models import bilinear as BL

METHODS = ("full", "rm", "ts_segment", "ts_dense")


def get_config(smoke: bool = False) -> ml_collections.ConfigDict:
    """Benchmark settings; ``smoke`` is the seconds-long setting of the test."""
    c = ml_collections.ConfigDict()
    c.batch = 16
    c.map_size = 14  # VGG16 conv5_3 / pool5 at 224 / 448 input, EfficientNet-Lite0 stage5 at 224
    c.channels = 512
    c.parts = 15
    c.window = 3
    c.dim = 8192  # Gao et al.'s CUB Tensor Sketch dimension
    c.methods = METHODS
    c.rss_methods = METHODS  # subprocess peak-RSS probes
    c.repeats = 3
    c.seed = 0
    if smoke:
        c.batch = 2
        c.map_size = 6
        c.channels = 16
        c.parts = 4
        c.dim = 64
        c.rss_methods = ()  # tests call `rss_probe` in-process instead of a subprocess
        c.repeats = 1
    return c


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median ``(wall s, process CPU s)`` of ``fn()`` after one warm-up call."""
    jax.block_until_ready(fn())
    walls, cpus = [], []
    for _ in range(max(1, repeats)):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _memory(compiled: Any) -> dict[str, int]:
    """XLA's compiled memory statistics (bytes); empty when the backend gives none."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return {k.replace("_size_in_bytes", "_bytes"): int(getattr(stats, k)) for k in keys}


def _inputs(cfg: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    b, s, c, p = cfg.batch, cfg.map_size, cfg.channels, cfg.parts
    return {
        "features": np.maximum(rng.normal(size=(b, s, s, c)), 0.0).astype(np.float32),
        "cells": rng.uniform(-0.5, s - 0.5, size=(b, p, 2)).astype(np.float32),
        "visible": rng.random((b, p)) > 0.2,
        "cotangent_parts": rng.normal(size=(b, p, c)).astype(np.float32),
    }


# ---------------------------------------------------------------------- coordinate transfer
def loop_coordinate_transfer(
    features: jax.Array, cells: np.ndarray, visible: np.ndarray, size: int
) -> jax.Array:
    """Baseline: a Python loop over images and parts, each an eager JAX slice and mean over the
    in-map window cells (same windows as `coordinate_transfer`)."""
    b, h, w, c = features.shape
    starts = np.asarray(window_starts(cells, (h, w), size))
    out = []
    for bi in range(b):
        row = []
        for p in range(cells.shape[1]):
            if not visible[bi, p]:
                row.append(jnp.zeros((c,), features.dtype))
                continue
            c0, r0 = (int(v) for v in starts[bi, p])
            win = features[bi, max(r0, 0) : min(r0 + size, h), max(c0, 0) : min(c0 + size, w)]
            row.append(jnp.mean(win, axis=(0, 1)))
        out.append(jnp.stack(row))
    return jnp.stack(out)


def bench_coordinate_transfer(cfg: Any, data: dict[str, np.ndarray]) -> dict[str, Any]:
    f = jnp.asarray(data["features"])
    cells, vis, n = data["cells"], data["visible"], int(cfg.window)
    ct = jnp.asarray(data["cotangent_parts"])
    fwd = jax.jit(lambda f, c, v: coordinate_transfer(f, c, v, n)[0]).lower(f, cells, vis).compile()
    bwd = jax.jit(jax.grad(lambda f, c, v: jnp.sum(coordinate_transfer(f, c, v, n)[0] * ct)))
    bwd = bwd.lower(f, cells, vis).compile()

    def loop() -> jax.Array:
        return loop_coordinate_transfer(f, cells, vis, n)

    a, ref = np.asarray(fwd(f, cells, vis)), np.asarray(loop())
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6)
    t_fwd, c_fwd = _time(lambda: fwd(f, cells, vis), cfg.repeats)
    t_bwd, c_bwd = _time(lambda: bwd(f, cells, vis), cfg.repeats)
    t_loop, c_loop = _time(loop, cfg.repeats)
    return {
        "shape": list(f.shape),
        "parts": int(cells.shape[1]),
        "window": n,
        "numbers_match_loop": True,
        "gather_forward_s": t_fwd,
        "gather_forward_cpu_s": c_fwd,
        "gather_forward_backward_s": t_bwd,
        "gather_forward_backward_cpu_s": c_bwd,
        "python_loop_forward_s": t_loop,
        "python_loop_forward_cpu_s": c_loop,
        "speedup_vs_loop_wall": t_loop / t_fwd,
        "speedup_vs_loop_cpu": c_loop / c_fwd,
        "gather_forward_memory": _memory(fwd),
        "gather_forward_backward_memory": _memory(bwd),
    }


# ----------------------------------------------------------------------------------- bilinear
def _sketch_fn(method: str, c: int, d: int, seed: int) -> tuple[Callable[..., jax.Array], tuple]:
    """``(fn(x, *params) -> (B, D) raw pooled sketch, params)`` of a method."""
    if method == "full":
        return (lambda x: BL.full_bilinear(x)), ()
    if method == "rm":
        return BL.random_maclaurin, BL.random_maclaurin_weights(seed, c, d)
    impl = method.split("_")[1]
    return (
        functools.partial(_ts, dim=d, impl=impl),
        BL.tensor_sketch_hashes(seed, c, d),
    )


def _ts(x, h1, s1, h2, s2, dim, impl):
    return BL.tensor_sketch(x, h1, s1, h2, s2, dim, impl=impl)


def _layer(sketch: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    return lambda x, *p: BL.l2_normalize(BL.signed_sqrt(sketch(x, *p)))


def _kernel_error(raw: np.ndarray, x: np.ndarray) -> float:
    """Mean relative error of ``⟨φ_b, φ_{b+1}⟩`` against ``Σ_{n,m} ⟨x_n, y_m⟩²``."""
    xs = x.reshape(x.shape[0], -1, x.shape[-1]).astype(np.float64)
    errs = []
    for b in range(xs.shape[0] - 1):
        exact = float(np.sum((xs[b] @ xs[b + 1].T) ** 2))
        approx = float(raw[b].astype(np.float64) @ raw[b + 1].astype(np.float64))
        errs.append(abs(approx - exact) / exact)
    return float(np.mean(errs))


def bench_bilinear(cfg: Any, data: dict[str, np.ndarray], method: str) -> dict[str, Any]:
    x = jnp.asarray(data["features"])
    c, d = x.shape[-1], int(cfg.dim)
    sketch, params = _sketch_fn(method, c, d, int(cfg.seed))
    layer = _layer(sketch)
    out_dim = c * c if method == "full" else d
    ct = jnp.asarray(np.random.default_rng(1).normal(size=(x.shape[0], out_dim)), jnp.float32)
    fwd = jax.jit(layer).lower(x, *params).compile()
    bwd = jax.jit(jax.grad(lambda x, *p: jnp.sum(layer(x, *p) * ct))).lower(x, *params).compile()
    raw = np.asarray(jax.jit(sketch)(x, *params))
    t_fwd, c_fwd = _time(lambda: fwd(x, *params), cfg.repeats)
    t_bwd, c_bwd = _time(lambda: bwd(x, *params), cfg.repeats)
    entry: dict[str, Any] = {
        "output_dim": out_dim,
        "forward_s": t_fwd,
        "forward_cpu_s": c_fwd,
        "forward_backward_s": t_bwd,
        "forward_backward_cpu_s": c_bwd,
        "forward_memory": _memory(fwd),
        "forward_backward_memory": _memory(bwd),
    }
    if method != "full":
        entry["kernel_rel_error"] = _kernel_error(raw, data["features"])
    return entry


def _status_kb(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_probe(cfg: Any, method: str) -> dict[str, float]:
    """In this (fresh) process: peak RSS above the baseline after inputs and compilation, for the
    forward and then the forward + backward of ``method`` (MiB). Linux only."""
    data = _inputs(cfg)
    x = jnp.asarray(data["features"])
    c, d = x.shape[-1], int(cfg.dim)
    sketch, params = _sketch_fn(method, c, d, int(cfg.seed))
    layer = _layer(sketch)
    out_dim = c * c if method == "full" else d
    ct = jnp.ones((x.shape[0], out_dim), jnp.float32)
    fwd = jax.jit(layer).lower(x, *params).compile()
    bwd = jax.jit(jax.grad(lambda x, *p: jnp.sum(layer(x, *p) * ct))).lower(x, *params).compile()
    jax.block_until_ready((x, params, ct))
    base = _status_kb("VmRSS")
    out = {}
    for name, fn in (("forward", fwd), ("forward_backward", bwd)):
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        r = fn(x, *params)
        jax.block_until_ready(r)
        out[f"{name}_peak_rss_mib"] = (_status_kb("VmHWM") - base) / 1024
        del r
    return out


def _run_probe(config: ml_collections.ConfigDict, method: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "experiments.benchmark_keypoints", "--probe", method]
    cmd += ["--probe_config", json.dumps(config.to_dict())]
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, check=False)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs every measurement; returns the nested result dict written as JSON."""
    cfg: Any = config
    results: dict[str, Any] = {
        "config": cfg.to_dict(),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(dv) for dv in jax.devices()],
            "jax_version": jax.__version__,
            "loadavg_at_start": os.getloadavg(),
            "note": "shared CPU with other jobs: wall times are noisy, CPU seconds less so",
        },
    }
    data = _inputs(cfg)
    results["coordinate_transfer"] = bench_coordinate_transfer(cfg, data)
    print(json.dumps({"coordinate_transfer": results["coordinate_transfer"]}, indent=1), flush=True)
    bil: dict[str, Any] = {}
    methods: Any = cfg.methods
    for method in methods:
        bil[method] = bench_bilinear(cfg, data, method)
        if method in cfg.rss_methods and sys.platform.startswith("linux"):
            bil[method]["host_rss"] = _run_probe(config, method)
        print(json.dumps({method: bil[method]}, indent=1), flush=True)
    results["bilinear"] = bil
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="seconds-long setting")
    parser.add_argument("--probe", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--probe_config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:  # internal: one peak-RSS probe in a fresh process, JSON on the last line
        config = ml_collections.ConfigDict(json.loads(args.probe_config))
        result = rss_probe(config, args.probe)
        print(json.dumps(result))
        return result
    if args.out is None:
        parser.error("--out is required")
    start = time.perf_counter()
    results = run(get_config(smoke=args.smoke))
    results["total_seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['total_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
