"""Our top-level `kernels` package must never be mistaken for Hugging Face's `kernels` library,
which transformers probes for by import name (find_spec) and distribution metadata."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_our_kernels_is_what_imports():
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and Path(spec.origin).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    import kernels

    for name in ("get_kernel", "kernelize", "LayerRepository", "use_kernel_forward_from_hub", "__version__"):
        assert not hasattr(kernels, name), name


def test_transformers_sees_no_hub_kernels_library():
    # Fresh interpreter: transformers caches the probe, and the check must hold from a clean start.
    code = (
        "import importlib.util, kernels, transformers\n"
        "from transformers.utils import import_utils as iu\n"
        "assert importlib.util.find_spec('kernels') is not None\n"
        "print(iu.is_kernels_available(), iu._is_package_available('kernels', return_version=True)[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    available, version = out.stdout.split()
    assert available == "False"
    # Either no version at all, or (when shrink is pip-installed) shrink's own version, which is
    # outside the range transformers accepts for the hub library.
    if version != "N/A":
        from transformers.utils.import_utils import KERNELS_MIN_VERSION
        from packaging import version as v

        assert v.parse(version) < v.parse(KERNELS_MIN_VERSION)


def test_transformers_loads_and_runs_a_llama_with_our_kernels_importable(tmp_path):
    code = (
        "import torch, kernels\n"
        "from transformers import LlamaConfig, AutoModelForCausalLM\n"
        "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                  num_attention_heads=2, num_key_value_heads=1)\n"
        "torch.manual_seed(0)\n"
        f"AutoModelForCausalLM.from_config(cfg).save_pretrained({str(tmp_path)!r})\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "ids = torch.tensor([[1, 2, 3]])\n"
        "out = m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)\n"
        "print(out.shape[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "6"
