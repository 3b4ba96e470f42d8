"""Model compression: 2:4 / unstructured pruning (magnitude, Wanda, SparseGPT) and quantization
(RTN, GPTQ, AWQ, SmoothQuant W8A8, fp8), run layer by layer on calibration data, saved in the
compressed-tensors format. Each algorithm is a small module that works on one weight matrix and
the statistics of its inputs; `calibration.py` drives them block by block through a model."""
