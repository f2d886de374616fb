"""The tiny trained Qwen3 target + DSpark drafter fixture pair: data, training, evaluation (see README.md)."""
