"""The arithmetic behind docs/scaling.md: model bytes, KV bytes per token, all-reduce bytes and time
per decode step, FSDP traffic per training step, for Llama-2-7B and -70B shapes (and Llama-3.1-405B
for the one-host limit). Pure arithmetic, no GPU: `python experiments/scaling_numbers.py [--json]`.

Shapes are the published configs. Link figures are ASSUMPTIONS (vendor peak or typical values), each
named in LINKS; the one measured figure is the H200 copy bandwidth of BENCHMARKS.md (fourth session).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

GiB, GB = 2**30, 1e9


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = 2 * h * h + 2 * h * kv                # q, o; k, v
        mlp = 3 * h * self.intermediate              # gate, up, down
        per_layer = attn + mlp + 2 * h               # two RMSNorms
        heads = self.vocab * h * (1 if self.tied else 2)
        return self.layers * per_layer + heads + h   # + final norm

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


SHAPES = {
    "llama2-7b": Shape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "llama2-70b": Shape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000),
    "llama3.1-405b": Shape("Llama-3.1-405B", 16384, 53248, 126, 128, 8, 128256),
}

# Bytes per second, one direction, per GPU unless said otherwise. ASSUMED unless marked measured.
LINKS = {
    "hbm_h200_measured": 4.27e12,   # MEASURED: device-to-device copy on the H200 (BENCHMARKS.md, 4th session)
    "nvlink4_per_dir": 450e9,       # ASSUMED: NVLink 4 (H100/H200 SXM), 900 GB/s bidirectional per GPU
    "ib_ndr_per_gpu": 50e9,         # ASSUMED: one 400 Gb/s InfiniBand NDR NIC per GPU (8 per node)
    "eth_100g_per_node": 12.5e9,    # ASSUMED: one 100 GbE link for a whole node
}
# Per all-reduce fixed cost (launch + synchronisation), ASSUMED: NCCL small messages.
LATENCY = {"nvlink": 8e-6, "ib": 25e-6}
BF16_TFLOPS_MEASURED = 672e12       # MEASURED: bf16 8192^3 matmul on the H200 (BENCHMARKS.md)
HOST_GPUS, H200_BYTES = 8, 139 * GiB  # ASSUMED: 8 GPUs per host; 139 GiB usable per H200 (the lab machine's figure)


def ring_allreduce_s(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce: each rank sends and receives 2(n-1)/n of the buffer, in 2(n-1) latency-bound hops
    (NCCL picks tree/LL protocols for small buffers; the ring is the bandwidth bound)."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + latency


def decode_numbers(shape: Shape, tp: int, batch: int, link: str) -> dict:
    """One decode step under tensor parallelism `tp`: weights read per GPU, the memory-bound step time,
    and the 2 all-reduces per layer (after attention's O and the MLP's down projection)."""
    weight_bytes = shape.params() * 2
    bw = LINKS["nvlink4_per_dir"] if link == "nvlink" else LINKS["ib_ndr_per_gpu"]
    ar_bytes = batch * shape.hidden * 2                  # [batch, hidden] bf16
    n_ar = 2 * shape.layers
    ar_s = ring_allreduce_s(ar_bytes, tp, bw, LATENCY[link])
    roofline_s = weight_bytes / (tp * LINKS["hbm_h200_measured"])
    return {"model": shape.name, "tp": tp, "batch": batch, "link": link,
            "weights_gb_per_gpu": weight_bytes / tp / GB, "roofline_ms": roofline_s * 1e3,
            "allreduce_bytes": ar_bytes, "allreduces_per_step": n_ar if tp > 1 else 0,
            "allreduce_us_each": ar_s * 1e6, "allreduce_ms_per_step": n_ar * ar_s * 1e3 if tp > 1 else 0.0,
            "allreduce_share": (n_ar * ar_s) / (roofline_s + n_ar * ar_s) if tp > 1 else 0.0}


def kv_capacity(shape: Shape, gpus: int, context: int) -> dict:
    weights = shape.params() * 2
    free = gpus * H200_BYTES - weights
    per_token = shape.kv_bytes_per_token()
    return {"model": shape.name, "gpus": gpus, "weights_gb": weights / GB, "free_for_kv_gb": free / GB,
            "kv_tokens": int(free // per_token) if free > 0 else 0,
            "seqs_at_context": int(free // (per_token * context)) if free > 0 else 0, "context": context}


def fsdp_step_traffic(student_params: float, teacher_params: float, gpus: int) -> dict:
    """Bytes each GPU moves per optimizer step under full sharding (FSDP2, bf16 all-gathers, fp32
    reduce-scatter as accelerate's bf16 policy does): the student's parameters gathered in forward
    and again in backward, its gradients reduce-scattered; the frozen teacher gathered once."""
    frac = (gpus - 1) / gpus
    gather = 2 * student_params * 2 * frac + teacher_params * 2 * frac
    reduce = student_params * 4 * frac
    return {"gpus": gpus, "gathers_gb": gather / GB, "reduce_scatter_gb": reduce / GB,
            "total_gb": (gather + reduce) / GB}


def hsdp_cross_node(student_params: float, nodes: int, gpus_per_node: int = HOST_GPUS) -> dict:
    """HSDP (shard inside a node, replicate across nodes): only the gradient all-reduce of each GPU's
    shard crosses nodes: 2(m-1)/m of (params x 4 bytes / gpus_per_node) per GPU, m = nodes."""
    shard = student_params * 4 / gpus_per_node
    return {"nodes": nodes, "cross_node_gb_per_gpu": 2 * (nodes - 1) / nodes * shard / GB}


def distill_step_flops(student_params: float, teacher_params: float, tokens: int) -> float:
    """6 N per token for the student (forward + backward), 2 N for the frozen teacher's forward."""
    return tokens * (6 * student_params + 2 * teacher_params)


def all_numbers() -> dict:
    s7, s70 = SHAPES["llama2-7b"], SHAPES["llama2-70b"]
    out: dict = {"links_assumed_or_measured": LINKS, "latency_assumed_s": LATENCY,
                 "shapes": {k: {**asdict(v), "params": v.params(), "weights_gb_bf16": v.params() * 2 / GB,
                                "kv_bytes_per_token_bf16": v.kv_bytes_per_token(),
                                "kv_gib_per_4k_sequence": v.kv_bytes_per_token() * 4096 / GiB}
                            for k, v in SHAPES.items()}}
    out["decode"] = [decode_numbers(s, tp, b, link) for s in (s7, s70) for tp in (1, 2, 4, 8) for b in (1, 64)
                     for link in ("nvlink", "ib") if not (tp == 1 and link == "ib")]
    out["kv_capacity"] = [kv_capacity(s, g, 4096) for s in (s7, s70, SHAPES["llama3.1-405b"]) for g in (1, 2, 4, 8)]
    # Distillation of each teacher into a half-depth student (the project's default student).
    out["training"] = []
    for s in (s7, s70):
        teacher = s.params()
        student = teacher - (s.layers // 2) * (s.params() - 2 * s.vocab * s.hidden) / s.layers
        tokens = 8 * 2048
        flops = distill_step_flops(student, teacher, tokens)
        row = {"teacher": s.name, "teacher_params": teacher, "student_params": int(student),
               "tokens_per_gpu_step": tokens, "step_tflop_per_gpu": flops / 1e12,
               "step_s_at_40pct_of_measured_peak": flops / (0.4 * BF16_TFLOPS_MEASURED)}
        for g in (8, 16, 64):
            t = fsdp_step_traffic(student, teacher, g)
            row[f"fsdp_{g}gpu_gb_per_gpu"] = t["total_gb"]
        row["fsdp_8gpu_s_nvlink"] = row["fsdp_8gpu_gb_per_gpu"] * GB / LINKS["nvlink4_per_dir"]
        row["fsdp_16gpu_s_ib"] = row["fsdp_16gpu_gb_per_gpu"] * GB / LINKS["ib_ndr_per_gpu"]
        row["hsdp_2nodes_cross_gb_per_gpu"] = hsdp_cross_node(student, 2)["cross_node_gb_per_gpu"]
        row["hsdp_2nodes_s_ib"] = row["hsdp_2nodes_cross_gb_per_gpu"] * GB / LINKS["ib_ndr_per_gpu"]
        row["training_state_gb"] = (student * 16 + teacher * 2) / GB  # fp32 w + grad + Adam m, v; bf16 teacher
        out["training"].append(row)
    # Prefix caching: what one shared 2,048-token prefix costs to recompute vs to keep / move.
    out["prefix"] = []
    for s in (s7, s70):
        tokens = 2048
        out["prefix"].append({"model": s.name, "prefix_tokens": tokens,
                              "kv_gib": s.kv_bytes_per_token() * tokens / GiB,
                              "recompute_ms_at_measured_peak": 2 * s.params() * tokens / BF16_TFLOPS_MEASURED * 1e3,
                              "move_over_ib_ms": s.kv_bytes_per_token() * tokens / LINKS["ib_ndr_per_gpu"] * 1e3})
    # Pipeline parallelism: bytes at one stage boundary.
    out["pipeline"] = [{"model": s.name, "decode_batch64_kib": 64 * s.hidden * 2 / 1024,
                        "prefill_4k_mib": 4096 * s.hidden * 2 / 2**20,
                        "prefill_4k_ms_over_ib": 4096 * s.hidden * 2 / LINKS["ib_ndr_per_gpu"] * 1e3}
                       for s in (s7, s70)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", action="store_true", help="everything as one JSON object")
    args = p.parse_args()
    numbers = all_numbers()
    if args.json:
        print(json.dumps(numbers, indent=1))
        return
    for section, rows in numbers.items():
        print(f"## {section}")
        if isinstance(rows, dict):
            for k, v in rows.items():
                print(f"{k}: {v}")
        else:
            for row in rows:
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
