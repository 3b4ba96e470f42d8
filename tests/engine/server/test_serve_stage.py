"""`python -m shrink stage=serve model=PATH serve.*=...`: bad settings fail in one line before any
work; good ones serve until interrupted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from support import REPO, run_cli


@pytest.mark.parametrize("args,words", [
    ([], "missing required value: model"),
    (["model=/nonexistent/dir"], "model: /nonexistent/dir is not a model directory"),
    (["model={tiny}", "serve.port=70000"], "serve.port"),
    (["model={tiny}", "serve.max_queue=-1"], "serve.max_queue"),
    (["model={tiny}", "serve.bogus=1"], "bogus"),
    (["model={tiny}", "serve.engine.block_size=0"], "block_size"),
    (["model={tiny}", "serve.speculative_config={{num_speculative_tokens:3}}"], "speculative_config"),
], ids=["no model", "no such dir", "bad port", "bad max_queue", "unknown key", "bad engine value", "speculative"])
def test_bad_settings_fail_in_one_line(tiny_artifact, tmp_path, args, words):
    result = run_cli("stage=serve", f"run={tmp_path}", "device=cpu", *[a.format(tiny=tiny_artifact) for a in args],
                     timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and words in err[0], result.stderr[-2000:]


def test_defaults_bind_loopback_and_name_only_known_keys():
    from dataclasses import fields

    from omegaconf import OmegaConf

    from engine.server import ServerConfig
    from shrink.stages.serve import ENGINE_KEYS

    defaults = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "serve" / "default.yaml"))
    assert defaults["host"] == ServerConfig().host == "127.0.0.1"
    assert set(defaults) == {f.name for f in fields(ServerConfig)} | set(ENGINE_KEYS)
    from engine.config import EngineConfig

    assert set(defaults["engine"]) <= {f.name for f in fields(EngineConfig)}  # serve.engine: EngineConfig fields


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_until_interrupted(tiny_artifact, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shrink", "stage=serve", f"model={tiny_artifact}", f"run={tmp_path}", "device=cpu",
         f"serve.port={port}", "serve.engine.max_model_len=128", "serve.api_key=k", "serve.log_level=warning"],
        cwd=REPO, env={**os.environ, "WANDB_SILENT": "true"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        headers = {"Authorization": "Bearer k"}
        models = httpx.get(url + "/v1/models", headers=headers).json()["data"]
        assert models[0]["id"] == "model" and models[0]["max_model_len"] == 128
        r = httpx.post(url + "/v1/completions", headers=headers, timeout=60,
                       json={"prompt": "hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
