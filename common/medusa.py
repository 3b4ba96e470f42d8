"""Medusa heads (Cai et al. 2024, "Medusa: simple LLM inference acceleration framework with multiple
decoding heads"): the contract between the stage that trains them (train/) and the engine that
drafts with them (engine/spec_decode/).

Why heads and not a small drafter model: on a target as small as SmolLM2-135M a batch-1 decode
step is bound by kernel launches, not bytes, so a drafter of a few layers costs a sizeable fraction
of a target step per drafted token and a 4-layer one accepted 23% at k = 1 (BENCHMARKS.md, issue
14). A head reads the target's own last hidden state, the best summary of the context there is, and
costs one residual block and a pass through the target's LM head: all k drafts of a round in one
small batch of matmuls, no draft model, no draft KV cache, no catch-up.

Head i (0-based) of the target's hidden state f_t at position t (the final norm's output, the LM
head's input) predicts token t + 2 + i, one further than the target's own next token:

    g = f_t;  for each of its ``num_layers`` blocks:  g = g + SiLU(W g + b);  logits_i = lm_head(g)

The LM head is the target's (shared, not stored). W and b start at zero, so an untrained head
predicts what the LM head does (Medusa's initialisation): training moves it from there.

The artifact is a directory: ``config.json`` (CONFIG_KEYS; ``architectures`` ["MedusaHeads"]),
``model.safetensors`` (``heads.{i}.{j}.weight`` [hidden, hidden] and ``heads.{i}.{j}.bias`` [hidden]
for head i, block j; every one present, no other), and the target's tokenizer files (the engine checks
the vocabulary as for a draft model). ``load_heads`` checks all of it and names what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "MedusaHeads"
CONFIG_KEYS = ("hidden_size", "vocab_size", "num_heads", "num_layers")
WEIGHTS_FILE = "model.safetensors"


class MedusaError(ValueError):
    """A Medusa artifact that cannot be read, or that does not fit its target."""


class MedusaHeads(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_layers: int = 1) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("vocab_size", vocab_size), ("num_heads", num_heads),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MedusaError(f"Medusa heads: {name} must be an integer >= 1, got {value!r}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_layers = num_heads, num_layers
        self.heads = nn.ModuleList(
            nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers)) for _ in range(num_heads))
        for p in self.parameters():
            nn.init.zeros_(p)

    def forward(self, features: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """[..., hidden] target hidden states -> [num_heads, ..., hidden]: each head's input to the LM
        head (the first ``num_heads`` heads only, if given)."""
        out = []
        for blocks in self.heads[: num_heads or self.num_heads]:
            g = features
            for block in blocks:
                g = g + F.silu(block(g))
            out.append(g)
        return torch.stack(out)

    def config(self) -> dict:
        return {"architectures": [ARCHITECTURE], "model_type": "medusa", "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "num_heads": self.num_heads, "num_layers": self.num_layers}


def is_medusa_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a Medusa artifact (its config.json names the architecture)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return ARCHITECTURE in json.loads(config.read_text()).get("architectures", [])
    except (json.JSONDecodeError, AttributeError):
        return False


def save_heads(heads: MedusaHeads, directory: str | Path) -> None:
    """config.json and model.safetensors into ``directory`` (which the caller made and owns)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    (directory / "config.json").write_text(json.dumps(heads.config(), indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, str(directory / WEIGHTS_FILE))


def load_heads(directory: str | Path, hidden_size: int | None = None, vocab_size: int | None = None) -> MedusaHeads:
    """The heads of a Medusa artifact, fp32 on the CPU, every tensor checked (names and shapes); with
    ``hidden_size`` / ``vocab_size`` given, also that they fit the target."""
    from safetensors import safe_open

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise MedusaError(f"{directory}: no config.json: not a Medusa artifact")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise MedusaError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or ARCHITECTURE not in config.get("architectures", []):
        raise MedusaError(f"{config_path}: architectures must name {ARCHITECTURE!r}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise MedusaError(f"{config_path}: missing {', '.join(missing)}")
    heads = MedusaHeads(*(config[k] for k in CONFIG_KEYS))
    for name, want in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
        if want is not None and config[name] != want:
            raise MedusaError(f"{config_path}: {name} {config[name]} does not match the target's {want}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise MedusaError(f"{directory}: no {WEIGHTS_FILE}")
    expected = heads.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        names = set(f.keys())
        absent, extra = sorted(set(expected) - names), sorted(names - set(expected))
        if absent or extra:
            raise MedusaError(f"{weights}: tensors missing {absent[:4]}{'...' if len(absent) > 4 else ''}, "
                              f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}")
        state = {}
        for name, ref in expected.items():
            t = f.get_tensor(name)
            if t.shape != ref.shape:
                raise MedusaError(f"{weights}: {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
            state[name] = t.float()
    heads.load_state_dict(state)
    return heads
