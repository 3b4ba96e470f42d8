"""Calibration segments: `num_samples` x `seq_len` token ids from a text source.

Sampling (deterministic in `seed`): documents are put in a seeded random order, tokenized without
BOS, joined with EOS between them, and the stream is cut into consecutive non-overlapping segments;
the first `num_samples` are used. Too little text for that is an error, never a silent shortfall.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import SettingError, ShrinkError


@dataclass(frozen=True)
class CalibConfig:
    source: str = "auto"        # auto | corpus | pydoc | a file path | a hub id (as data.source)
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    batch_size: int = 8          # segments per forward through a block

    def __post_init__(self) -> None:
        for key in ("num_samples", "seq_len", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingError(f"calibration.{key}", f"must be an integer >= 1 (got {value!r})")


def calibration_ids(cfg: CalibConfig, tokenizer, data_dir: Path | None) -> torch.Tensor:
    from train.data import load_documents, resolve_source

    source = resolve_source(cfg.source, data_dir)
    docs = load_documents(source)
    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ShrinkError("the tokenizer has no EOS token to separate calibration documents")
    need = cfg.num_samples * cfg.seq_len
    stream: list[int] = []
    for start in range(0, len(order), 64):
        batch = [docs[i] for i in order[start:start + 64]]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise SettingError("calibration.num_samples", f"{source} holds {len(stream)} tokens, fewer than "
                           f"num_samples x seq_len = {cfg.num_samples} x {cfg.seq_len} = {need}; "
                           f"lower num_samples or seq_len, or use more data")
    return torch.tensor(stream[:need], dtype=torch.long).view(cfg.num_samples, cfg.seq_len)
