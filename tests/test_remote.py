"""Stores at URLs: caching to and training from an S3 bucket, on a real S3 API (moto's standalone
server on 127.0.0.1, started here), configured only through the standard AWS_* environment.
Unknown URL schemes are refused, never taken as local paths."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import generate_activations
import train_sweep
from runtime.location import location
from store.zarr_store import ActivationStore, StoreError
from tests.conftest import free_port, gen_args
from tests.test_cache import assert_identical_stores, store_digest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 with an empty bucket `acts`; the AWS_* environment that
    points s3fs at it (set for this module's tests and inherited by their subprocesses)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "moto's server did not start"
            time.sleep(0.1)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("acts")
        yield env
    server.terminate()
    server.wait(timeout=30)


def _remote_digest(url: str) -> dict[str, str]:
    """sha256 of every object under `url`, by relative key."""
    fs, root = location(url).filesystem()
    return {path[len(root) + 1:]: hashlib.sha256(fs.cat_file(path)).hexdigest() for path in sorted(fs.find(root))}


def _train(cache: str, out: Path, *extra: str):
    args = ["--cache", cache, "--source", SOURCE, "--output_dir", str(out), "--l1_min", "-3", "--l1_max", "-2",
            "--n_models", "2", "--ratio", "2", "--batch_size", "64", "--eval_tokens", "400", "--eval_sequences", "0", *extra]
    return CliRunner().invoke(train_sweep.main, args)


def test_cache_to_and_train_from_an_s3_bucket_as_from_a_local_store(s3_env, text_dir, small_store, tmp_path):
    """Same arguments, --out s3://…: the objects are byte for byte the local store's files;
    training from the bucket (through a local read-through cache) gives the local run's weights,
    and evaluation finds the store at its URL."""
    url = "s3://acts/run/cache"
    result = CliRunner().invoke(generate_activations.main, gen_args(url, text_dir) + ["--hooks", "blocks.2.hook_mlp_out"])
    assert result.exit_code == 0, result.output
    assert f"store {url}:" in result.output
    assert _remote_digest(url) == store_digest(small_store)
    assert not Path("s3:").exists() and not (ROOT / "s3:").exists()
    assert CliRunner().invoke(generate_activations.main, ["--verify", "--out", url]).exit_code == 0

    local, remote = tmp_path / "local", tmp_path / "remote"
    assert _train(str(small_store), local).exit_code == 0
    result = _train(url, remote, "--cache_dir", str(tmp_path / "chunk-cache"))
    assert result.exit_code == 0, result.output
    assert any((tmp_path / "chunk-cache").iterdir()), "the read-through cache stayed empty"
    summary = json.loads((remote / "sweep.json").read_text())
    assert summary["store"]["path"] == url and all("fvu" in m for m in summary["members"])
    for m in summary["members"]:
        a = load_file(local / m["dir"] / "sae_weights.safetensors")
        b = load_file(remote / m["dir"] / "sae_weights.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_mid_upload_leaves_an_incomplete_store_that_resumes(s3_env, text_dir, tmp_path):
    url = "s3://acts/killed/cache"
    args = gen_args(url, text_dir, **{"--n_tokens": "12000"})
    process = subprocess.Popen([sys.executable, str(ROOT / "generate_activations.py"), *args], cwd=ROOT,
                               env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs, root = location(url).filesystem()
    deadline = time.monotonic() + 180
    while not fs.exists(f"{root}/manifest.blocks/000001.json"):  # two blocks uploaded
        assert process.poll() is None and time.monotonic() < deadline, "generation ended before it could be killed"
        time.sleep(0.05)
        fs.invalidate_cache()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    with pytest.raises(StoreError, match="incomplete|not complete|unfinished"):
        ActivationStore.open(url)
    refused = _train(url, tmp_path / "refused")
    assert refused.exit_code == 1 and "generate_activations.py" in refused.output

    result = CliRunner().invoke(generate_activations.main, args)
    assert result.exit_code == 0, result.output
    assert "resum" in result.output
    local = tmp_path / "local"
    assert CliRunner().invoke(generate_activations.main, gen_args(local, text_dir, **{"--n_tokens": "12000"})).exit_code == 0
    assert _remote_digest(url) == store_digest(local)
    assert_identical_stores(ActivationStore.open(url), ActivationStore.open(local))


def test_an_unknown_url_scheme_is_refused_not_taken_as_a_path(text_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(generate_activations.main, gen_args("foo://bucket/cache", text_dir))
    assert result.exit_code == 1 and "foo:// is not a storage scheme" in result.output
    assert list(tmp_path.iterdir()) == []
    result = _train("foo://bucket/cache", tmp_path / "run")
    assert result.exit_code == 1 and "foo:// is not a storage scheme" in result.output


def test_s3_without_its_client_names_the_extra_to_install(text_dir, tmp_path, monkeypatch):
    """As on a machine without s3fs: the import fails, and the message says what to install."""
    registry = sys.modules["fsspec.registry"]._registry  # fsspec's table of imported filesystem classes
    monkeypatch.setitem(sys.modules, "s3fs", None)
    for protocol in ("s3", "s3a"):
        monkeypatch.delitem(registry, protocol, raising=False)
    result = CliRunner().invoke(generate_activations.main, gen_args("s3://acts/x", text_dir))
    assert result.exit_code == 1 and "pip install 'sae-sweep[s3]'" in result.output


def test_object_store_locks_use_a_conditional_put(s3_env):
    """On S3 (moto's server), the second of two writers is refused by the If-None-Match: * put."""
    from runtime.lock import LockError, OutputLock

    with OutputLock("s3://acts/locks/run", "first"):
        with pytest.raises(LockError, match="being written by pid"):
            OutputLock("s3://acts/locks/run", "second").acquire()
    with OutputLock("s3://acts/locks/run", "again"):  # released
        pass
