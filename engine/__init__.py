"""The serving engine: requests in, tokens out, many requests sharing each batched forward of the model.

One request's path: :mod:`engine.request` (what it asks for) -> :mod:`engine.scheduler` (admission, token
budget, preemption; the books of :mod:`engine.kv_cache`) -> :mod:`engine.runner` (one forward over the KV
tensors of :mod:`engine.paged_kv`, then :mod:`engine.sampler`) -> back to the scheduler's update ->
:class:`engine.request.RequestOutput`. :mod:`engine.core` is the three-line step; :mod:`engine.thread` runs it
beside an asyncio server.
"""
