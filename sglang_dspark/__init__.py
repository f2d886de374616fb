"""sglang-dspark: DSpark speculative decoding for SGLang (``--speculative-algorithm DSPARK``)."""

import logging

logger = logging.getLogger("sglang_dspark")

__version__ = "0.1.0"
