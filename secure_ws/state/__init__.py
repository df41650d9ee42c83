"""Shared state behind narrow interfaces: :mod:`.storage` (the interface), :mod:`.memory` (one process) and
:mod:`.memory_history` (its channel history), :mod:`.redis_storage` (many workers and hosts) on :mod:`.redis_url` (one Redis, Sentinel or Cluster) and
:mod:`.redis_pubsub` (its pub/sub reader), :mod:`.local_window`
(this process's sliding windows) and :mod:`.url` (the backend named by ``SECURE_WS_STORAGE_URL``)."""
