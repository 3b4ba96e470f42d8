"""Model compression: 2:4 / unstructured pruning (magnitude, Wanda, SparseGPT) and quantization
(RTN, GPTQ, AWQ, SmoothQuant W8A8, fp8), run layer by layer on calibration data, saved in the
compressed-tensors format.

- `methods/`: one registered class per method (its math beside it); `recipe.py` builds them by
  name and checks a recipe's order (transforms, then one weight quantizer).
- `calibration.py`: the sequential driver; it knows only the `BlockMethod` protocol.
- `compress_artifact.py`: what stage=prune and stage=quantize share (load, check, calibrate,
  compress, save); `settings.py` reads their config sections.
- primitives: `quant.py` (its QuantSpec in the torch-free `scheme.py`), `sparsity.py`, `hessian.py`, `stats.py`,
  `fold.py`, `modules.py` (QuantLinear), `compressed_tensors_io.py` (the on-disk format), `calib_data.py`,
  `finetune.py`, `fake_quant.py` (quantization-aware training onto quant.py's grid, for train/loop.py).
"""
