"""Refit: a trainer's tensors into a rollout engine's parameters, every RL step.

Trainer::

    layout = BucketLayout.of(named_tensors, per_layer=True)        # once
    sender = Sender(layout, "cuda")
    handles = share(sender.buckets)                                 # once, to the rollout process
    sender.pack(named_tensors, version=step)                        # every step

Rollout engine::

    buckets = open_shared(handles)                                  # once
    refitter = Refitter(model, layout, buckets, config="config.json", tp=(rank, size))
    report = refitter.step(version=step)                            # one launch a bucket

Across GPUs or hosts, :func:`broadcast` replaces ``share``/``open_shared`` (each side allocates its
buckets from the layout, ``layout.allocate(device)``, and calls it every step).
"""

from .buckets import BucketLayout, Entry, Sender
from .refitter import RefitError, RefitReport, Refitter
from .transport import broadcast, open_shared, share

__all__ = ["BucketLayout", "Entry", "Sender", "Refitter", "RefitReport", "RefitError", "share", "open_shared",
           "broadcast"]
