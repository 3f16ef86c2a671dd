"""Layer-streamed forward passes for the activation step.

`corpus` turns text into seeded token batches, `layers` builds one decoder / encoder layer at a time
from the checkpoint (transformers modules where they exist, `pangu` for Pangu Pro MoE), `stream`
runs blocks of layers over a pass of hidden states and records norms, and `parallel` spreads the work
over ranks (data-parallel or pipeline).
"""

from npu_fp.forward.errors import (
    ActivationInputError,
    CorpusError,
    SequenceLengthError,
    TokenizerError,
    TokenizerMissingError,
    UnsupportedArchitectureError,
    WeightLayoutError,
)

__all__ = [
    "ActivationInputError",
    "CorpusError",
    "SequenceLengthError",
    "TokenizerError",
    "TokenizerMissingError",
    "UnsupportedArchitectureError",
    "WeightLayoutError",
]
