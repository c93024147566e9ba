"""The model's compute kernels, each fast path beside its plain reference twin.

* :mod:`model.kernels.mxfp4` — MXFP4 (de)quantization.
* :mod:`model.kernels.prepacked` — the oneDNN prepacked linear for bf16 weights on the CPU.
"""
