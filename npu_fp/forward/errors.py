"""Named errors for the activation step: every one is a ValueError raised before device work starts."""

from __future__ import annotations


class ActivationInputError(ValueError):
    """Bad input to the activation step; the message names the file or setting and what was expected."""


class TokenizerError(ActivationInputError):
    """tokenizer.json is unreadable or does not fit the model (token ids beyond the vocabulary)."""


class TokenizerMissingError(TokenizerError):
    """The checkpoint folder has no tokenizer.json."""


class CorpusError(ActivationInputError):
    """The corpus is missing, empty, not UTF-8, malformed JSONL, or too short for one sequence."""


class SequenceLengthError(ActivationInputError):
    """activations.seq_len exceeds the positions the model was built for."""


class UnsupportedArchitectureError(ActivationInputError):
    """No layer-streamed forward exists for this architecture."""


class WeightLayoutError(ActivationInputError):
    """A layer's tensors do not match what its forward implementation expects (missing, extra, shape)."""
