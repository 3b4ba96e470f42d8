"""Stage registry. A stage is a module in this package with a function decorated by
`@register_stage("name")`, taking `(cfg, ctx)` and returning an Artifact. Modules are imported
on first lookup, so adding a stage is adding a file (and its conf/stage/<name>.yaml)."""

from __future__ import annotations

from common.registry import Registry

STAGES: Registry = Registry("stage", __name__, __path__)
register_stage = STAGES.register


def get_stage(name: str):
    return STAGES.get(name)

