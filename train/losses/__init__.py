"""Distillation losses, one file per family, each registered by name.

Families: `ce` (hard labels), `forward_kl`, `reverse_kl` (kl.py), `jsd` (generalized JSD(beta),
jsd.py), `tvd` (total variation, tvd.py).

A loss is a small object called as `loss(student, teacher, labels, mask)` on one chunk of
tokens: `student` and `teacher` are fp32 logits [n, vocab], `labels` the next-token ids [n],
`mask` a bool [n] of the tokens that count, or None when all do (the fused path passes None:
boolean indexing has a data-dependent shape, which torch.compile cannot fuse). It returns the SUM over masked tokens, so chunks add
up; the caller divides by the number of tokens.
"""

from __future__ import annotations

from typing import Any

from common.errors import SettingError, ShrinkError
from common.registry import Registry

LOSSES: Registry = Registry("loss", __name__, __path__)
register_loss = LOSSES.register


def make_loss(name: str, **kwargs: Any):
    return LOSSES.get(name)(**kwargs)


def parse_loss_spec(spec: Any, temperature: float) -> list[tuple[str, float, Any]]:
    """`{name: weight}` or `{key: {loss: family, weight: w, beta: ..., temperature: ...}}` ->
    [(key, weight, loss object)]. `loss` defaults to the key, so `{jsd: {beta: 0.9}}` works and two
    JSDs can be mixed under different keys. Terms with weight 0 are dropped. A bad spec is a
    SettingError of the setting `losses` (or `losses.<key>...`)."""
    if not spec:
        raise SettingError("losses", "is empty: name at least one loss with a weight", sep=" ")
    out = []
    for key, value in dict(spec).items():
        if isinstance(value, (int, float)):
            weight, kwargs, family = float(value), {}, str(key)
        else:
            try:
                kwargs = dict(value)
            except (TypeError, ValueError):
                raise SettingError(f"losses.{key}", f"expected a weight or a mapping, got {value!r}") from None
            family = str(kwargs.pop("loss", key))
            weight = float(kwargs.pop("weight", 1.0))
        kwargs.setdefault("temperature", temperature)
        if float(kwargs["temperature"]) <= 0:
            raise SettingError(f"losses.{key}.temperature", f"must be > 0, got {kwargs['temperature']}", sep=" ")
        if weight != 0.0:
            try:
                out.append((str(key), weight, make_loss(family, **kwargs)))
            except SettingError as e:  # a bad argument of the loss, e.g. jsd's beta
                raise e.in_section(f"losses.{key}") from None
            except ShrinkError as e:  # an unknown loss family
                raise SettingError(f"losses.{key}", str(e)) from None
    if not out:
        raise SettingError("losses", "every weight is 0")
    return out


def loss_names() -> list[str]:
    return LOSSES.names()
