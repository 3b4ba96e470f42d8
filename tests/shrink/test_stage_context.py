"""StageContext carries the run's shared data and cache directories: the config key, else the
environment's default."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from shrink.compress.settings import stage_cache_dir, stage_data_dir
from shrink.context import StageContext


def _ctx(tmp_path: Path, **top) -> StageContext:
    cfg = OmegaConf.create({"run": str(tmp_path), "device": "cpu", "seed": 0, "stage": {"name": "prune"},
                            "data_dir": None, "cache_dir": None, **top})
    return StageContext(cfg, tmp_path)


def test_config_keys_win(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_DATA_DIR", str(tmp_path / "env_data"))
    monkeypatch.setenv("SHRINK_CACHE_DIR", str(tmp_path / "env_cache"))
    ctx = _ctx(tmp_path, data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert (ctx.data_dir, ctx.cache_dir) == (tmp_path / "data", tmp_path / "cache")
    assert (stage_data_dir(ctx), stage_cache_dir(ctx)) == (ctx.data_dir, ctx.cache_dir)


def test_environment_when_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_DATA_DIR", str(tmp_path / "env_data"))
    monkeypatch.setenv("SHRINK_CACHE_DIR", str(tmp_path / "env_cache"))
    ctx = _ctx(tmp_path)
    assert (ctx.data_dir, ctx.cache_dir) == (tmp_path / "env_data", tmp_path / "env_cache")
