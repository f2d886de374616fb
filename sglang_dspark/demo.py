"""DSpark speculative decoding on CPU with the tiny trained pair, in the reference loop.

    python -m sglang_dspark.demo [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--gamma G]

Uses ``tests/fixtures/tiny-qwen3`` (target) and ``tests/fixtures/tiny-qwen3-dspark`` (drafter) of the
source checkout this package was installed from (``pip install -e``); see
``benchmark/tiny/README.md``. Prints the generated code, the acceptance per draft position, the mean
acceptance length, and tokens/s of speculative decoding and of the target alone (same token count),
and, for greedy decoding, whether the speculative output equals the target's own greedy output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_dspark.checkpoint import DSparkCheckpointError, load_draft
from sglang_dspark.reference.decode import speculative_generate, target_generate
from sglang_dspark.reference.drafter import DSparkDrafter
from sglang_dspark.reference.sampling import SamplingParams

logger = logging.getLogger("sglang_dspark")

REPO = Path(__file__).resolve().parents[1]
TARGET_DIR = REPO / "tests" / "fixtures" / "tiny-qwen3"
DRAFT_DIR = REPO / "tests" / "fixtures" / "tiny-qwen3-dspark"
HUMANEVAL_PROMPTS = REPO / "benchmark" / "tiny" / "humaneval_code.jsonl"


class DemoSetupError(RuntimeError):
    """The tiny pair or the default prompt is not where a source checkout has them."""


@dataclass
class TinyPair:
    target: torch.nn.Module  # transformers Qwen3ForCausalLM, float32, eval
    drafter: DSparkDrafter
    tokenizer: object  # transformers PreTrainedTokenizerFast


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise DemoSetupError(
            f"{what} not found at {path}. The demo uses the tiny pair committed in the sglang-dspark "
            "source repository (tests/fixtures/tiny-qwen3, tests/fixtures/tiny-qwen3-dspark); install "
            "the package from a checkout with `pip install -e <repo>` (a wheel does not ship them)."
        )


def load_tiny_pair(target_dir: Path = TARGET_DIR, draft_dir: Path = DRAFT_DIR) -> TinyPair:
    """The fixture target, its tokenizer and the drafter (via ``load_draft``), float32 on CPU."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    _require(target_dir, "tiny target")
    _require(draft_dir, "tiny drafter")
    target = Qwen3ForCausalLM.from_pretrained(target_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    ckpt = load_draft(draft_dir, target_config=target.config, dtype=torch.float32)
    drafter = DSparkDrafter(ckpt.config, dtype=torch.float32)
    drafter.load_state_dict(ckpt.weights, strict=True)
    return TinyPair(target, drafter.eval(), tokenizer)


def default_prompt(path: Path = HUMANEVAL_PROMPTS) -> str:
    """The first HumanEval code block (``benchmark/tiny/humaneval_code.jsonl``)."""
    _require(path, "default prompt file")
    with open(path) as f:
        return json.loads(f.readline())["text"]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_dspark.demo",
        description=(
            "Run DSpark speculative decoding on CPU with the tiny trained Qwen3 pair (tests/fixtures/"
            "tiny-qwen3 + tiny-qwen3-dspark) in the PyTorch reference loop, and compare it with the "
            "target generating alone."
        ),
        epilog=(
            "Exit status: 0 ok, 1 setup error or (greedy) the speculative output differs from the "
            "target's greedy output, 2 bad arguments. Example: python -m sglang_dspark.demo --max-new-tokens 64"
        ),
    )
    parser.add_argument(
        "--prompt", default=None,
        help="The prompt text. Default: the first HumanEval code block (benchmark/tiny/humaneval_code.jsonl).",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="The number of tokens to generate.")
    parser.add_argument(
        "--temperature", type=float, default=0.0,
        help="The sampling temperature; 0 means greedy decoding (the default).",
    )
    parser.add_argument(
        "--gamma", type=int, default=None,
        help="The number of draft tokens per verify step, 1..block_size. Default: the draft's block_size (7).",
    )
    parser.add_argument("--seed", type=int, default=0, help="The random seed for sampling (temperature > 0).")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and does not fight a busy box
    try:
        pair = load_tiny_pair()
        prompt = args.prompt if args.prompt is not None else default_prompt()
    except (DemoSetupError, DSparkCheckpointError) as exc:
        parser.exit(1, f"error: {exc}\n")
    block_size = pair.drafter.config.block_size
    gamma = block_size if args.gamma is None else args.gamma
    if not 1 <= gamma <= block_size:
        parser.error(f"--gamma must be in 1..{block_size} (the draft's block_size), got {gamma}")
    prompt_ids = pair.tokenizer(prompt)["input_ids"]
    if not prompt_ids:
        parser.error("--prompt must not be empty")
    sampling = SamplingParams(temperature=args.temperature)
    eos = pair.tokenizer.eos_token_id

    # One untimed target forward so that neither timed run pays for first-call setup.
    with torch.no_grad():
        pair.target(input_ids=torch.tensor([prompt_ids]))
    with torch.no_grad(), _progress(args.max_new_tokens, "DSpark") as bar:
        start = time.perf_counter()
        spec = speculative_generate(
            pair.target, pair.drafter, prompt_ids, args.max_new_tokens, gamma, sampling,
            torch.Generator().manual_seed(args.seed), eos, on_tokens=bar.update,
        )
        spec_s = time.perf_counter() - start
    with torch.no_grad(), _progress(len(spec.tokens), "target") as bar:
        start = time.perf_counter()
        plain = target_generate(
            pair.target, prompt_ids, len(spec.tokens), sampling, torch.Generator().manual_seed(args.seed), eos,
            on_tokens=bar.update,
        )
        plain_s = time.perf_counter() - start

    steps = len(spec.committed_per_step)
    mode = "greedy" if sampling.is_greedy else f"temperature {args.temperature}, seed {args.seed}"
    lines = [
        f"DSpark demo: target {TARGET_DIR.name} + drafter {DRAFT_DIR.name}, gamma {gamma}, {mode}, "
        "CPU (1 thread)",
        "--- prompt ---",
        prompt.rstrip("\n"),
        f"--- generated code ({len(spec.tokens)} tokens) ---",
        pair.tokenizer.decode(spec.tokens).rstrip("\n"),
        "--- acceptance ---",
        f"verify steps: {steps}",
        "acceptance per position (share of verify steps whose j-th draft token was accepted):",
    ]
    for j, (acc, prop) in enumerate(zip(spec.accepted_per_position, spec.proposed_per_position), start=1):
        share = acc / prop if prop else 0.0
        lines.append(f"  position {j}: {100 * share:5.1f}% ({acc}/{prop})")
    lines += [
        f"mean acceptance length: {spec.mean_committed:.2f} tokens per verify step (bonus token included)",
        "--- speed ---",
        f"speculative: {len(spec.tokens)} tokens in {spec_s:.2f} s = {len(spec.tokens) / spec_s:.1f} tokens/s",
        f"target only: {len(plain)} tokens in {plain_s:.2f} s = {len(plain) / plain_s:.1f} tokens/s",
        f"speedup: {(len(spec.tokens) / spec_s) / (len(plain) / plain_s):.2f}x",
    ]
    if sampling.is_greedy:
        same = spec.tokens == plain
        lines.append(f"speculative output equals the target's greedy output: {'yes' if same else 'NO'}")
        if not same:
            first = next(i for i, (x, y) in enumerate(zip(spec.tokens + [None], plain + [None])) if x != y)
            lines.append(f"  first difference at generated token {first}")
    else:
        lines.append("speculative output vs the target's: not compared (sampling; equal only in distribution)")
    print("\n".join(lines))
    return 0 if not sampling.is_greedy or spec.tokens == plain else 1


if __name__ == "__main__":
    sys.exit(main())
