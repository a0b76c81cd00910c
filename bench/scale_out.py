"""Scale-out, side by side in one run: one process vs two torchrun ranks, and a store on S3 vs
the same store on local disk.

    python -m bench.scale_out                     # 131k rows, d 512; 4 ReLU SAEs × 1024 latents, batch 4096
    python -m bench.scale_out --rows 262144 --repeats 3

Every variant runs the same `train_sweep.py` command (2 epochs, --no_eval) as a subprocess on one
synthetic store (Gaussian rows, fp16, d 512) and reports its `train_seconds` from sweep.json: the
training loop alone, without imports, store opening or export. The variants run in rotating order,
`--repeats` times, so a slow spell of a shared machine falls on all of them alike.

  1 process      one process with every core (OMP_NUM_THREADS = cores)
  2 ranks        torchrun --nproc_per_node 2, ensemble-parallel, each rank one thread per core it
                 gets (cores / 2): the cores are shared honestly, not doubled
  s3             one process reading the store from moto's S3 server on 127.0.0.1 (started here;
                 an in-process object store, so this measures the client path and prefetch, not a
                 network), with and without --cache_dir
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from bench._common import format_table

ROOT = Path(__file__).resolve().parents[1]


def write_store(path: Path, n_rows: int, d: int, chunk_rows: int = 8192, seed: int = 0) -> None:
    """A complete store of Gaussian rows (one source, one sequence per 128 rows)."""
    from store.zarr_store import ActivationStore, RowBlock, SourceInfo

    per_seq = 128
    store = ActivationStore.create(
        path, identity={"bench": "scale_out"}, sources=[SourceInfo("x", "bench", "blocks.0.hook_resid_post", d, 0)],
        n_rows=n_rows, n_sequences=n_rows // per_seq, context_length=per_seq, chunk_rows=chunk_rows,
        block_rows=n_rows, storage_dtype="float16",
        info={"model_name": "bench", "context_length": per_seq, "prepend_bos": False, "exclude_bos": False,
              "dataset": "gaussian"},
    )
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n_rows, d), dtype=np.float32)
    norms = np.linalg.norm(values, axis=1).astype(np.float64)
    ids = np.arange(n_rows, dtype=np.int32)
    sequences = np.zeros((n_rows // per_seq, per_seq), dtype=np.int32)
    store.write_block(0, RowBlock(ids % 1000, ids % per_seq, ids // per_seq, {"x": values.astype(np.float16)},
                                  {"x": (norms.sum(), (norms ** 2).sum(), n_rows)}, sequences))
    store.finish()


def upload(local: Path, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(url.split("/")[2])
    fs.put(str(local), url, recursive=True)


def start_moto() -> tuple[subprocess.Popen, dict[str, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    return server, env


def train(cache: str, out: Path, threads: int, ranks: int = 1, extra: tuple[str, ...] = (), env: dict | None = None) -> float:
    """One sweep; → seconds of its training loop."""
    args = [str(ROOT / "train_sweep.py"), "--cache", cache, "--output_dir", str(out), "--l1_min", "-3", "--l1_max", "-2",
            "--n_models", "4", "--ratio", "2", "--batch_size", "4096", "--n_epochs", "2", "--eval_tokens", "4096",
            "--no_eval", "--overwrite", *extra]
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(ranks)]
    run_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([*launcher, *args], env=run_env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    return json.loads((out / "sweep.json").read_text())["train_seconds"]


@click.command()
@click.option("--rows", type=int, default=131_072)
@click.option("--d", type=int, default=512)
@click.option("--repeats", type=int, default=2)
@click.option("--s3/--no_s3", "with_s3", default=True, help="Also measure a store on moto's S3 server.")
def main(rows: int, d: int, repeats: int, with_s3: bool) -> None:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        tmp = Path(tmp)
        write_store(tmp / "store", rows, d)
        server, env = start_moto() if with_s3 else (None, {})
        try:
            if with_s3:
                os.environ.update(env)
                upload(tmp / "store", "s3://bench/store")
            variants = {
                f"1 process × {cores} threads": lambda i: train(str(tmp / "store"), tmp / f"one-{i}", cores),
                f"2 ranks × {max(1, cores // 2)} thread(s)": lambda i: train(str(tmp / "store"), tmp / f"two-{i}",
                                                                            max(1, cores // 2), ranks=2),
            }
            if with_s3:
                variants["1 process, store on S3 (moto)"] = lambda i: train("s3://bench/store", tmp / f"s3-{i}", cores,
                                                                            env=env)
                variants["1 process, S3 + --cache_dir"] = lambda i: train(
                    "s3://bench/store", tmp / f"s3c-{i}", cores, extra=("--cache_dir", str(tmp / f"chunks-{i}")), env=env)
            times: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for i in range(repeats):
                for name in names[i % len(names):] + names[: i % len(names)]:
                    times[name].append(variants[name](i))
        finally:
            if server is not None:
                server.terminate()
    base = min(times[names[0]])
    table = [[name, f"{min(t):.2f}", " ".join(f"{x:.2f}" for x in t), f"{base / min(t):.2f}×"] for name, t in times.items()]
    steps = 2 * ((rows - 4096) // 4096)
    print(f"store: {rows:,} rows × d {d} (fp16); 4 ReLU SAEs × {2 * d} latents, batch 4096, ~{steps} steps; {cores} cores")
    print(format_table(["variant", "best train s", "all runs", "speed vs 1 process"], table))


if __name__ == "__main__":
    main()
