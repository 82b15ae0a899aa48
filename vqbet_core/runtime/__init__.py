"""Plain Python + onnxruntime policy runtime for exported model folders (no torch import).

``PolicyRuntime`` (vqbet_core.runtime.policy) loads a folder written by ``vqbet export`` and turns
observations into timestamped ``ActionChunk``s; ``vqbet_core.runtime.chunks`` blends overlapping
chunks and drops points that are already in the past. Model folder layout: DESIGN.md section 4.
"""

from vqbet_core.runtime.chunks import ActionChunk, blend_chunks, drop_past
from vqbet_core.runtime.policy import PolicyRuntime
from vqbet_core.runtime.spec import ModelSpec, load_spec

__all__ = ["ActionChunk", "ModelSpec", "PolicyRuntime", "blend_chunks", "drop_past", "load_spec"]
