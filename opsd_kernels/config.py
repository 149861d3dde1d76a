"""Library-wide settings.

``chunk_memory_budget`` (bytes) bounds the working memory of the chunked
paths: the per-chunk logits buffers of ``fused_linear_divergence`` and the
float32 temporaries of the torch paths. It is read when a call picks its
chunk size (``chunk_size=None``), so it can be changed at any time::

    import opsd_kernels
    opsd_kernels.config.chunk_memory_budget = 256 * 2**20

Its default comes from the environment variable ``OPSD_CHUNK_MEMORY_MB``
(megabytes), else 512 MiB.
"""

import os

chunk_memory_budget: int = int(float(os.environ.get("OPSD_CHUNK_MEMORY_MB", "512")) * 2**20)
