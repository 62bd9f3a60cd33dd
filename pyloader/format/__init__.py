"""Checkpoint files: safetensors headers, checkpoint directories, and which tensor scales which weight."""
