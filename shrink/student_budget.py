"""Student by budget: the shape of the largest student of a teacher's config that meets one target,
in parameters, in saved bytes, or in batch-1 decode latency measured with our engine; reached by
depth, by width, or both.

Families of shapes (each ordered by size):
- depth: the teacher's width, fewer decoder layers (which layers: importance, when it is built).
- width: every layer; hidden (embedding) channels in steps of `width_step` (a multiple of 8 and of the
  attention heads: transformers refuses to save a config whose hidden size the heads do not divide),
  the MLP scaled in proportion (a multiple of 8), as Minitron's width students shrink embedding and
  MLP channels; a parameter or byte budget then widens the chosen shape's MLP to fill what the coarse
  hidden step leaves (`fill_mlp`). Attention heads stay, unless student.width.num_attention_heads
  fixes a count (every candidate then has it).
- both: a Minitron-style split: the depth whose layer removal alone comes nearest to half of the
  parameters to remove (ties: the deeper), then the widest width at that depth that meets the
  target, so depth and width each take about half of the cut.
A byte budget is a parameter budget at the save dtype's width (every saved tensor is cast to it;
tied embeddings are saved, and counted, once). A latency budget measures candidates (random
weights of the shape, the engine's dummy load, warm-up then the median of timed decodes) by
bisection over the family, as latency grows with size; `both` bisects over its shapes at 1/64
steps of the teacher's parameters. Measurements are cached by shape, device model and torch version
(`cached_latency`), so a resumed run and every rank of a launch choose the same student (timings
are noisy; a fresh measurement could tip a choice); delete cache_dir/latency to measure again.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import SettingError, ShrinkError
from train.student_init import head_dim

AXES = ("depth", "width", "both")
TARGET_KEYS = ("target_params", "target_bytes", "target_latency_ms")
BOTH_GRID = 64
WIDTH_STEP = 8


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int

    @classmethod
    def of(cls, config: Any) -> "Shape":
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads)

    def apply(self, config: Any) -> Any:
        """A copy of `config` with this shape (head_dim kept: it would otherwise follow the hidden size)."""
        shaped = copy.deepcopy(config)
        shaped.head_dim = head_dim(config)
        shaped.num_hidden_layers, shaped.hidden_size = self.layers, self.hidden_size
        shaped.intermediate_size, shaped.num_attention_heads = self.intermediate_size, self.num_attention_heads
        if getattr(shaped, "layer_types", None):
            shaped.layer_types = list(shaped.layer_types)[: self.layers]
        return shaped


def count_params(config: Any) -> int:
    """Parameters of a model of this config (built on the meta device: no memory, exact for any
    architecture; tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


class ParamCounter:
    """Exact parameter counts of shapes of one config: every decoder layer has the same parameters,
    so a count is base + layers * per_layer, measured once per width from models of 1 and 2 layers."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._lines: dict[tuple[int, int, int], tuple[int, int]] = {}

    def __call__(self, shape: Shape) -> int:
        key = (shape.hidden_size, shape.intermediate_size, shape.num_attention_heads)
        if key not in self._lines:
            one, two = (count_params(dataclasses.replace(shape, layers=n).apply(self.config)) for n in (1, 2))
            self._lines[key] = (one - (two - one), two - one)
        base, per_layer = self._lines[key]
        return base + shape.layers * per_layer


def width_at(config: Any, layers: int, hidden: int, heads: int) -> Shape:
    inter = config.intermediate_size * hidden / config.hidden_size
    return Shape(layers, hidden, max(WIDTH_STEP, WIDTH_STEP * round(inter / WIDTH_STEP)), heads)


def depth_family(config: Any, heads: int) -> list[Shape]:
    return [Shape(n, config.hidden_size, config.intermediate_size, heads)
            for n in range(1, config.num_hidden_layers + 1)]


def width_step(heads: int) -> int:
    """The step of the hidden sizes tried: a multiple of WIDTH_STEP that `heads` divides."""
    return math.lcm(WIDTH_STEP, heads)


def width_family(config: Any, layers: int, heads: int) -> list[Shape]:
    step = width_step(heads)
    hiddens = list(range(step, config.hidden_size, step)) + [config.hidden_size]
    return [width_at(config, layers, h, heads) for h in hiddens]


def fill_mlp(config: Any, shape: Shape, count: ParamCounter, limit: int) -> Shape:
    """`shape` with the widest MLP (a multiple of WIDTH_STEP, at most the teacher's) within `limit`
    parameters: the hidden sizes move in coarse steps (9 heads: 72 channels), the MLP takes up what a
    step leaves, so that width students meet a budget as closely as depth ones."""
    lo, hi = shape.intermediate_size // WIDTH_STEP, config.intermediate_size // WIDTH_STEP
    while lo < hi:  # parameters grow with the MLP: bisect for the largest that fits
        mid = (lo + hi + 1) // 2
        if count(dataclasses.replace(shape, intermediate_size=mid * WIDTH_STEP)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return dataclasses.replace(shape, intermediate_size=max(shape.intermediate_size, lo * WIDTH_STEP))


def smaller_than_teacher(shapes: list[Shape], count: ParamCounter, teacher: int) -> list[Shape]:
    return sorted({s for s in shapes if count(s) < teacher}, key=count)


def largest_within(shapes: list[Shape], count: ParamCounter, target: int) -> Shape | None:
    fits = [s for s in shapes if count(s) <= target]
    return max(fits, key=count) if fits else None


def both_shape(config: Any, count: ParamCounter, target: int, heads: int) -> Shape | None:
    """Half the removal by depth (the nearest layer count), the rest by width at that depth."""
    teacher = count(Shape.of(config))
    half = (teacher - target) / 2
    depths = depth_family(config, heads)
    depth = min(depths, key=lambda s: (abs(teacher - count(s) - half), -s.layers))
    return largest_within(width_family(config, depth.layers, heads), count, target)


def family(config: Any, by: str, heads: int, count: ParamCounter) -> list[Shape]:
    """Every candidate of `by` smaller than the teacher, ascending in parameters."""
    teacher = count(Shape.of(config))
    if by == "depth":
        shapes = depth_family(config, heads)
    elif by == "width":
        shapes = width_family(config, config.num_hidden_layers, heads)
    else:
        grid = (both_shape(config, count, teacher * j // BOTH_GRID, heads) for j in range(1, BOTH_GRID))
        shapes = [s for s in grid if s is not None]
    return smaller_than_teacher(shapes, count, teacher)


def check_budget(targets: dict[str, float | None], by: str) -> str | None:
    """The one budget key set (None: no budget); one clear error for a bad combination or value."""
    if by not in AXES:
        raise SettingError("student.budget_by", f"expected one of {', '.join(AXES)}, got {by!r}")
    set_keys = [k for k in TARGET_KEYS if targets.get(k) is not None]
    if len(set_keys) > 1:
        raise SettingError(', '.join("student." + k for k in set_keys), "set at most one budget "
                          f"(one of {', '.join('student.' + k for k in TARGET_KEYS)})")
    if set_keys and not float(targets[set_keys[0]]) > 0:
        raise SettingError(f"student.{set_keys[0]}", f"must be > 0, got {targets[set_keys[0]]}", sep=" ")
    return set_keys[0] if set_keys else None


def engine_decode_ms(config: Any, device: str, *, new_tokens: int = 32, warmup_tokens: int = 8, repeats: int = 3,
                     prompt_len: int = 4, clock: Callable[[], float] = time.perf_counter) -> float:
    """Batch-1 greedy decode milliseconds per token of a model of `config` with random weights in our
    engine on `device`: one warm-up decode, then the median of `repeats` timed decodes of
    `new_tokens` (a `prompt_len`-token prompt, so the prefill is a small share)."""
    from engine import LLM, SamplingParams

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    prompt = [[3 + (i % max(1, config.vocab_size - 3)) for i in range(prompt_len)]]
    runs: list[float] = []
    with tempfile.TemporaryDirectory() as model_dir:
        config.save_pretrained(model_dir)
        max_len = prompt_len + max(new_tokens, warmup_tokens) + 16
        # A KV pool of one sequence: sized by free memory, it would take most of a GPU the stage shares.
        llm = LLM(model_dir, load_format="dummy", device=device, max_num_seqs=1, cuda_graph_max_bs=1,
                  max_model_len=max_len, kv_cache_tokens=max_len, enable_prefix_caching=False)
        try:
            llm.generate(prompt, SamplingParams(temperature=0, max_tokens=warmup_tokens, ignore_eos=True))
            params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
            for _ in range(repeats):
                sync()
                start = clock()
                out = llm.generate(prompt, params)
                sync()
                runs.append(clock() - start)
                if len(out[0].token_ids) != new_tokens:
                    raise ShrinkError(f"latency budget: the engine decoded {len(out[0].token_ids)} of "
                                      f"{new_tokens} tokens")
        finally:
            llm.close()
            del llm
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return 1000.0 * statistics.median(runs) / new_tokens


def cached_latency(cache_dir: Path, device: str,
                   measure: Callable[[Any], float] | None = None) -> Callable[[Any], float]:
    """`measure` (default engine_decode_ms on `device`) with each result kept in cache_dir/latency, by
    the shape's config, the device model and torch's version."""
    measure = measure or (lambda cfg: engine_decode_ms(cfg, device))
    hardware = (torch.cuda.get_device_name() if device.startswith("cuda")
                else f"cpu:{platform.processor() or platform.machine()}")

    def cached(config: Any) -> float:
        key = hashlib.sha256(f"{config.to_json_string(use_diff=False)}|{hardware}|{torch.__version__}".encode())
        path = cache_dir / "latency" / f"{key.hexdigest()[:24]}.json"
        if path.is_file():
            return float(json.loads(path.read_text())["ms_per_token"])
        ms = float(measure(config))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"ms_per_token": ms, "hardware": hardware, "torch": torch.__version__}))
        os.replace(tmp, path)
        return ms

    return cached


def describe(shape: Shape) -> str:
    return (f"{shape.layers} layers, hidden {shape.hidden_size}, MLP {shape.intermediate_size}, "
            f"{shape.num_attention_heads} heads")


def choose_shape(config: Any, key: str, target: float, by: str, *, heads: int | None = None,
                 save_dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                 measure: Callable[[Any], float] | None = None) -> dict[str, Any]:
    """The largest student shape of `config` by `by` that meets `student.<key>` = `target`, with its
    parameters, saved bytes and (latency budget) the measured milliseconds per token of the
    candidates tried. `measure(config) -> ms` defaults to engine_decode_ms on `device`."""
    check_budget({key: target}, by)
    heads = heads or config.num_attention_heads
    count = ParamCounter(config)
    teacher = count(Shape.of(config))
    itemsize = save_dtype.itemsize
    out: dict[str, Any] = {"by": by, "key": key, "target": target}
    if key == "target_latency_ms":
        shape, out["measured"] = _by_latency(config, family(config, by, heads, count), count, target, by, device,
                                             measure)
    else:
        limit = int(target) if key == "target_params" else int(target) // itemsize
        if not 0 < limit < teacher:
            raise ShrinkError(f"student.{key}={target:,}: must be below the teacher's "
                              f"{teacher if key == 'target_params' else teacher * itemsize:,} "
                              f"{'parameters' if key == 'target_params' else 'bytes at ' + str(save_dtype)}")
        if by == "both":
            shape = both_shape(config, count, limit, heads)
        else:
            shape = largest_within(family(config, by, heads, count), count, limit)
        if shape is not None and by != "depth":
            shape = fill_mlp(config, shape, count, limit)
        if shape is None:
            smallest = family(config, by, heads, count)
            floor = (f" (the smallest, {describe(smallest[0])}, has {count(smallest[0]):,} parameters)"
                     if smallest else "")
            other = "width" if by == "depth" else "depth"
            raise ShrinkError(f"student.{key}={target:,}: no {by} student fits{floor}; use student.budget_by={other} "
                              f"or a larger target")
    return {**out, **dataclasses.asdict(shape), "params": count(shape), "bytes": count(shape) * itemsize}


def _by_latency(config: Any, shapes: list[Shape], count: ParamCounter, target: float, by: str, device: str,
                measure: Callable[[Any], float] | None) -> tuple[Shape, list[dict]]:
    measure = measure or (lambda cfg: engine_decode_ms(cfg, device))
    if not shapes:
        raise ShrinkError(f"student.target_latency_ms: the teacher has no smaller {by} student")
    measured: dict[int, float] = {}

    def ms(i: int) -> float:
        if i not in measured:
            measured[i] = float(measure(shapes[i].apply(config)))
            print(f"distill: latency budget: {describe(shapes[i])}: {measured[i]:.3f} ms/token on {device}")
        return measured[i]

    if ms(0) > target:
        raise ShrinkError(f"student.target_latency_ms={target}: the smallest {by} student ({describe(shapes[0])}) "
                          f"decodes at {measured[0]:.3f} ms/token on {device}; use a larger target")
    lo, hi = 0, len(shapes) - 1  # shapes[lo] meets the target; find the last that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ms(mid) <= target else (lo, mid - 1)
    log = [{**dataclasses.asdict(shapes[i]), "params": count(shapes[i]), "ms_per_token": v}
           for i, v in sorted(measured.items())]
    return shapes[lo], log
