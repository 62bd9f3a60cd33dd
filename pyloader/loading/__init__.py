"""Loading: ``pyloader.load`` and what it runs (sources, batching, readers, the streaming executor)."""
