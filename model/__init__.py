"""The gpt-oss model: the network, its weights and its checkpoints.

* :mod:`model.config` — :class:`~model.config.ModelConfig` from either published ``config.json`` layout.
* :mod:`model.weights` — finding (local dir or Hugging Face id), validating and loading safetensors.
* :mod:`model.make_checkpoint` — random checkpoints in the published formats, for tests and benchmarks.
* :mod:`model.batch` — what a forward computes over: :class:`~model.batch.AttentionMetadata` and the
  :class:`~model.batch.KVCache` seam (a layer's slots and the step's block tables) a paged cache implements.
* :mod:`model.gpt_oss` — the transformer, built with its attention and experts implementations injected.
* :mod:`model.kernels` — those implementations (attention, experts, MXFP4, the prepacked linear), each fast
  path beside its reference twin.

The serving engine built on it is the :mod:`engine` package.
"""
