"""Pure-PyTorch DSpark reference (imports no sglang, runs on CPU): the oracle of the SGLang path.

* ``drafter``: ``DSparkDrafter`` (backbone + heads, canonical tensor names) and ``ContextKVCache``.
* ``heads``: Markov heads (vanilla / gated / rnn) and the confidence head.
* ``sampling``: SGLang's target probability processing and the draft distribution.
* ``accept``: batched greedy and rejection-sampling acceptance (the rule the GPU kernels must match).
* ``decode``: the speculative decode loop over a Hugging Face Qwen3 target, and ``target_generate``.
"""

from sglang_dspark.reference.accept import AcceptResult, accept_drafts
from sglang_dspark.reference.drafter import ContextKVCache, DraftProposal, DSparkDrafter
from sglang_dspark.reference.heads import (
    ConfidenceHead,
    GatedMarkovHead,
    MarkovHead,
    RNNMarkovHead,
    VanillaMarkovHead,
    build_confidence_head,
    build_markov_head,
)
from sglang_dspark.reference.sampling import SamplingBatch, SamplingParams

__all__ = [
    "AcceptResult",
    "ConfidenceHead",
    "ContextKVCache",
    "DSparkDrafter",
    "DraftProposal",
    "GatedMarkovHead",
    "MarkovHead",
    "RNNMarkovHead",
    "SamplingBatch",
    "SamplingParams",
    "VanillaMarkovHead",
    "accept_drafts",
    "build_confidence_head",
    "build_markov_head",
]
