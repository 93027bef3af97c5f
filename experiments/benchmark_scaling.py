"""Benchmark: data-parallel training and dataset-wide maps on 1 process x 1 device, 1 x 2 and
2 processes x 1 device (issue 16), on the machine it runs on (CPU devices).

Each configuration runs in fresh processes (``--worker``): ``jax_num_cpu_devices`` devices per
process, and for two processes `fgloc.distributed.initialize` on a loopback coordinator with gloo
collectives. The same small convolutional network (`SmallCNN`: three stride-2 3x3 convolutions,
32/64/128 channels, global average pooling, a 10-way linear head; 94,538 parameters) on the same
synthetic 64 x 64 RGB images, float32:

* ``train``: `fgloc.train.fit` with `array_batches` (global batch ``batch_size``, each process
  reading its slice), Adam, softmax cross-entropy; the first ``warmup_steps`` (compilation)
  are excluded; ``train_images_per_s`` = global images per wall second of the next ``steps``
  steps, ``train_step_ms`` the wall time per step;
* ``map``: `fgloc.distributed.map_rows` of the network's pooled features over ``map_images``
  images (each process its own block, batches over its local devices, gathered on every
  process); ``map_images_per_s`` of a second call (the first compiles);
* ``allreduce_ms``: median wall time of one all-reduce of a gradient-sized float32 vector (94,538
  values) over the configuration's devices — the cross-process (or cross-device) reduction
  that every training step contains (~0 for one device).

Wall times on a shared machine include other jobs' load: the configurations run ``rounds``
times, interleaved (1x1, 1x2, 2x1, 1x1, ...) so that all see the same background load, and each
figure is the median over the rounds (every round's value is kept, ``*_rounds``); the JSON
records the load average at the start and end of every run and each process's CPU seconds. ``--smoke`` (the test
of the script) uses one 8-channel convolution on 16 x 16 images and a few steps. The workers'
logs go to ``FILE.work/``.

Run::

    nice -n 10 python -m experiments.benchmark_scaling --out /tmp/benchmark_scaling.json [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

CONFIGS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # name: (processes, devices each)


def settings(smoke: bool) -> dict[str, Any]:
    if smoke:  # one narrow convolution: the script end to end, little to compile
        return dict(batch_size=4, warmup_steps=1, steps=2, map_images=8, image_size=16, reps=3,
                    widths=[8], rounds=1)  # fmt: skip
    return dict(batch_size=32, warmup_steps=3, steps=30, map_images=512, image_size=64, reps=30,
                widths=[32, 64, 128], rounds=3)  # fmt: skip


def _model(widths: list[int]):
    import flax.linen as nn

    class SmallCNN(nn.Module):
        """Stride-2 3x3 convolutions of `widths` channels (ReLU), global average pool, linear 10."""

        @nn.compact
        def __call__(self, x, features_only: bool = False):
            for width in widths:
                x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2))(x))
            x = x.mean(axis=(1, 2))
            return x if features_only else nn.Dense(10)(x)

    return SmallCNN()


def _worker(name: str, process_id: int, port: int, result: pathlib.Path, smoke: bool) -> None:
    import jax

    nproc, ndev = CONFIGS[name]
    jax.config.update("jax_num_cpu_devices", ndev)
    from fgloc import distributed

    if nproc > 1:
        distributed.initialize(f"127.0.0.1:{port}", nproc, process_id, initialization_timeout=120)
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fgloc import train

    cfg = settings(smoke)
    cpu0 = time.process_time()
    s = cfg["image_size"]
    rs = np.random.default_rng(0)
    n_train = 4 * cfg["batch_size"]
    arrays = {
        "image": rs.normal(size=(n_train, s, s, 3)).astype(np.float32),
        "label": rs.integers(0, 10, n_train).astype(np.int32),
    }
    model = _model(cfg["widths"])
    params = jax.jit(model.init)(jax.random.key(0), arrays["image"][:1])["params"]  # one compile
    n_params = sum(int(np.size(v)) for v in jax.tree.leaves(params))

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng
        logits = jnp.asarray(model.apply({"params": params}, batch["image"]))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {}

    tx = optax.adam(1e-3)
    mesh = train.data_mesh()
    step = train.make_train_step(loss_fn, tx, mesh)
    batches = train.array_batches(arrays, cfg["batch_size"], seed=0)
    fit = functools.partial(train.fit, mesh=mesh, rng=jax.random.key(1), progress=False)
    state = jax.jit(lambda p: train.create_train_state(p, tx))(params)
    state, _ = fit(state, step, batches, num_steps=cfg["warmup_steps"])
    jax.block_until_ready(state)
    distributed.barrier("benchmark_scaling:train")
    t = time.perf_counter()
    total = cfg["warmup_steps"] + cfg["steps"]
    state, _ = fit(state, step, batches, num_steps=total)
    jax.block_until_ready(state)
    train_s = time.perf_counter() - t

    images = rs.normal(size=(cfg["map_images"], s, s, 3)).astype(np.float32)

    def features(batch):
        return model.apply({"params": params}, batch["image"], features_only=True)

    def load(ids):
        return {"image": images[ids]}

    rows = np.arange(cfg["map_images"])
    local_batch = max(1, cfg["batch_size"] // nproc)
    distributed.map_rows(features, rows, load, batch_size=local_batch)  # compiles
    distributed.barrier("benchmark_scaling:map")
    t = time.perf_counter()
    out = distributed.map_rows(features, rows, load, batch_size=local_batch)
    map_s = time.perf_counter() - t
    assert out.shape == (len(rows), cfg["widths"][-1])

    grads = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data")), np.ones((len(mesh.local_devices), n_params), np.float32)
    )
    reduce = jax.jit(lambda g: jnp.sum(g, axis=0), out_shardings=NamedSharding(mesh, P()))
    jax.block_until_ready(reduce(grads))
    times = []
    for _ in range(cfg["reps"]):
        t = time.perf_counter()
        jax.block_until_ready(reduce(grads))
        times.append(time.perf_counter() - t)
    got = np.asarray(reduce(grads).addressable_data(0))
    assert np.all(got == len(mesh.devices.flat)), "all-reduce gave a wrong sum"
    record = {
        "processes": nproc,
        "devices_per_process": ndev,
        "global_devices": len(jax.devices()),
        "train_images_per_s": cfg["batch_size"] * cfg["steps"] / train_s,
        "train_step_ms": 1e3 * train_s / cfg["steps"],
        "map_images_per_s": cfg["map_images"] / map_s,
        "allreduce_ms": 1e3 * statistics.median(times),
        "allreduce_values": n_params,
        "params": n_params,
        "process_cpu_s": time.process_time() - cpu0,
        "final_step": int(state.step),
    }
    result.write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_config(name: str, workdir: pathlib.Path, smoke: bool, timeout: float) -> dict[str, Any]:
    nproc, _ = CONFIGS[name]
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    workdir.mkdir(parents=True, exist_ok=True)
    results = [workdir / f"{name}-{i}.json" for i in range(nproc)]
    logs = [workdir / f"{name}-{i}.log" for i in range(nproc)]
    load_start = os.getloadavg()
    procs: list[subprocess.Popen] = []
    try:
        for i in range(nproc):
            cmd = [sys.executable, "-m", "experiments.benchmark_scaling", "--worker", name,
                   "--process-id", str(i), "--port", str(port), "--result", str(results[i])]  # fmt: skip
            if smoke:
                cmd.append("--smoke")
            with open(logs[i], "w") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for p, log in zip(procs, logs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(
                f"{name}: worker failed ({p.returncode}):\n{log.read_text()[-3000:]}"
            )
    records = [json.loads(r.read_text()) for r in results]
    record = records[0]
    record["process_cpu_s"] = [r["process_cpu_s"] for r in records]
    record["loadavg_start"] = load_start
    record["loadavg_end"] = os.getloadavg()
    return record


_TIMED = ("train_images_per_s", "train_step_ms", "map_images_per_s", "allreduce_ms")


def run(out: pathlib.Path, smoke: bool) -> dict[str, Any]:
    import importlib.metadata

    workdir = out.with_suffix(".work")
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "jax": importlib.metadata.version("jax"),
            "device": "CPU (XLA host platform; cross-process collectives: gloo over loopback)",
        },
        "settings": settings(smoke),
        "smoke": smoke,
        "configs": {},
    }
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for r in range(results["settings"]["rounds"]):  # interleaved: all see the same load
        for name in CONFIGS:
            rounds[name].append(_run_config(name, workdir / f"round{r}", smoke, timeout=600))
    for name, records in rounds.items():
        merged = dict(records[0])
        for key in _TIMED:
            merged[key] = statistics.median(rec[key] for rec in records)
            merged[f"{key}_rounds"] = [rec[key] for rec in records]
        merged["process_cpu_s"] = [rec["process_cpu_s"] for rec in records]
        merged["loadavg_start"] = [rec["loadavg_start"] for rec in records]
        merged["loadavg_end"] = [rec["loadavg_end"] for rec in records]
        results["configs"][name] = merged
    c = results["configs"]
    results["summary"] = {
        "train_speedup_1x2_vs_1x1": c["1x2"]["train_images_per_s"] / c["1x1"]["train_images_per_s"],
        "train_speedup_2x1_vs_1x1": c["2x1"]["train_images_per_s"] / c["1x1"]["train_images_per_s"],
        "map_speedup_1x2_vs_1x1": c["1x2"]["map_images_per_s"] / c["1x1"]["map_images_per_s"],
        "map_speedup_2x1_vs_1x1": c["2x1"]["map_images_per_s"] / c["1x1"]["map_images_per_s"],
        "cross_process_allreduce_ms": c["2x1"]["allreduce_ms"],
        "in_process_allreduce_ms": c["1x2"]["allreduce_ms"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmark_scaling.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a test of the script)")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.process_id, args.port, args.result, args.smoke)
        return
    results = run(args.out, args.smoke)
    print(json.dumps({"summary": results["summary"], "out": str(args.out)}, indent=2))


if __name__ == "__main__":
    main()
