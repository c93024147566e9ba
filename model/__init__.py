"""The gpt-oss model: the network, its weights and its checkpoints.

* :mod:`model.config` — :class:`~model.config.ModelConfig` from either published ``config.json`` layout.
* :mod:`model.weights` — finding (local dir or Hugging Face id), validating and loading safetensors.
* :mod:`model.kernels.mxfp4` — MXFP4 dequantization, reference and fast path.
* :mod:`model.gpt_oss` — the transformer, :class:`~model.gpt_oss.AttentionMetadata` and the
  :class:`~model.gpt_oss.KVCache` protocol a paged cache implements.
* :mod:`model.make_checkpoint` — random checkpoints in the published formats, for tests and benchmarks.

The serving engine built on it is the :mod:`engine` package.
"""
