"""Acceptance of the tiny pair with the reference decode loop on CPU (gamma 7).

Prompts: the ```python blocks of the HumanEval prompts (``humaneval_code.jsonl`` beside this file, cut
from DeepSpec's ``eval_datasets/humaneval.jsonl``) and the held-out stdlib snippets the training run
wrote next to the target (``heldout_prompts.jsonl``). For each set and mode it reports the mean
acceptance length (committed tokens per verify step, bonus included, pooled over all steps) and the
per-position acceptance (fraction of steps whose draft at position j was accepted). Modes: greedy,
temperature 1.0, and the same drafter with its Markov head switched off (DFlash ablation), greedy
and temperature 1.0.

    python benchmark/tiny/evaluate.py [--target DIR] [--draft DIR] [--out report.json] [--card README.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    _ROOT = Path(__file__).resolve().parents[2]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(_ROOT))

import torch
from transformers import AutoTokenizer, PreTrainedModel, Qwen3ForCausalLM

from benchmark.tiny.data import read_jsonl
from sglang_dspark.checkpoint import load_draft
from sglang_dspark.reference.decode import speculative_generate
from sglang_dspark.reference.drafter import DSparkDrafter
from sglang_dspark.reference.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[2]
TARGET_DIR = REPO / "tests" / "fixtures" / "tiny-qwen3"
DRAFT_DIR = REPO / "tests" / "fixtures" / "tiny-qwen3-dspark"
HUMANEVAL_PROMPTS = Path(__file__).resolve().parent / "humaneval_code.jsonl"
HELDOUT_PROMPTS_FILE = "heldout_prompts.jsonl"
CARD_BEGIN, CARD_END = "<!-- results:begin -->", "<!-- results:end -->"


@dataclass
class Pair:
    target: PreTrainedModel
    drafter: DSparkDrafter
    tokenizer: object


def load_pair(target_dir: Path = TARGET_DIR, draft_dir: Path = DRAFT_DIR, dtype: torch.dtype = torch.float32) -> Pair:
    """The target (``Qwen3ForCausalLM``), its tokenizer and the drafter (via ``load_draft``), in ``dtype`` on CPU."""
    target = Qwen3ForCausalLM.from_pretrained(target_dir, dtype=dtype, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    ckpt = load_draft(draft_dir, target_config=target.config, dtype=dtype)
    if ckpt.config.mask_token_id != tokenizer.mask_token_id:
        raise ValueError(
            f"{draft_dir}/config.json: mask_token_id {ckpt.config.mask_token_id} differs from the target "
            f"tokenizer's mask token id {tokenizer.mask_token_id} ({target_dir}/tokenizer_config.json)"
        )
    drafter = DSparkDrafter(ckpt.config, dtype=dtype)
    drafter.load_state_dict(ckpt.weights, strict=True)
    return Pair(target, drafter.eval(), tokenizer)


def without_markov(drafter: DSparkDrafter) -> DSparkDrafter:
    """The same backbone with no Markov head (and no confidence head): the DFlash ablation."""
    config = drafter.config.replace(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False)
    ablated = DSparkDrafter(config, dtype=drafter.dtype)
    kept = {k: v for k, v in drafter.state_dict().items() if not k.startswith(("markov_head.", "confidence_head."))}
    ablated.load_state_dict(kept, strict=True)
    return ablated.eval()


def load_prompts(target_dir: Path = TARGET_DIR, humaneval: Path = HUMANEVAL_PROMPTS) -> dict[str, list[str]]:
    """{"humaneval": [...], "stdlib_heldout": [...]} prompt texts."""
    sets = {}
    for name, path in (("humaneval", humaneval), ("stdlib_heldout", target_dir / HELDOUT_PROMPTS_FILE)):
        if not path.is_file():
            raise FileNotFoundError(f"evaluate.py: prompt file {path} does not exist")
        sets[name] = [row["text"] for row in read_jsonl(path)]
    return sets


def acceptance(
    pair: Pair,
    drafter: DSparkDrafter,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    gamma: int = 7,
    deadline: float | None = None,
) -> dict:
    """Speculative generation of every prompt (until ``time.monotonic() > deadline``, if given);
    pooled acceptance statistics."""
    sampling = SamplingParams(temperature=temperature)
    gen = torch.Generator().manual_seed(seed)
    committed: list[int] = []
    accepted = [0] * gamma
    proposed = [0] * gamma
    conf_sum, conf_n, cond_acc, cond_n = [0.0] * gamma, [0] * gamma, [0] * gamma, [0] * gamma
    tokens, done = 0, 0
    for text in prompts:
        if deadline is not None and time.monotonic() > deadline:
            break
        done += 1
        ids = pair.tokenizer(text)["input_ids"]
        res = speculative_generate(pair.target, drafter, ids, max_new_tokens, gamma=gamma, sampling=sampling, generator=gen)
        committed += res.committed_per_step
        tokens += len(res.tokens)
        for j in range(gamma):
            accepted[j] += res.accepted_per_position[j]
            proposed[j] += res.proposed_per_position[j]
        for logits, c in zip(res.confidence_logits, res.committed_per_step):
            a = c - 1
            for j in range(min(a + 1, gamma)):  # position j was reached (all before it accepted)
                conf_sum[j] += float(torch.sigmoid(logits[j]))
                conf_n[j] += 1
                cond_acc[j] += int(j < a)
                cond_n[j] += 1
    out = {
        "prompts": done,
        "steps": len(committed),
        "tokens": tokens,
        "mean_accept_len": round(sum(committed) / max(len(committed), 1), 4),
        "per_position": [round(a / max(p, 1), 4) for a, p in zip(accepted, proposed)],
        "conditional_per_position": [round(a / max(n, 1), 4) for a, n in zip(cond_acc, cond_n)],
    }
    if any(conf_n):
        out["confidence_mean_per_position"] = [round(s / max(n, 1), 4) for s, n in zip(conf_sum, conf_n)]
    return out


MODES = (
    ("greedy", 0.0, True),
    ("temp1", 1.0, True),
    ("dflash_greedy", 0.0, False),
    ("dflash_temp1", 1.0, False),
)


def evaluate(pair: Pair, prompt_sets: dict[str, list[str]], max_new_tokens: int, seed: int,
             modes=MODES, log=print) -> dict:
    """{mode: {set: acceptance stats}} for each (mode, temperature, with_markov) in ``modes``."""
    ablated = without_markov(pair.drafter)
    results: dict = {}
    for mode, temperature, with_markov in modes:
        drafter = pair.drafter if with_markov else ablated
        for name, prompts in prompt_sets.items():
            start = time.monotonic()
            stats = acceptance(pair, drafter, prompts, max_new_tokens, temperature, seed)
            results.setdefault(mode, {})[name] = stats
            log(f"{mode:14s} {name:15s} accept_len {stats['mean_accept_len']:.3f} per-position "
                f"{stats['per_position']} ({stats['steps']} steps, {time.monotonic() - start:.0f}s)")
    return results


TEST_SUBSET_PROMPTS = 4  # per prompt set
TEST_SUBSET_NEW_TOKENS = 64


def band_subset_acceptance(pair: Pair, prompt_sets: dict[str, list[str]]) -> dict:
    """Greedy acceptance on the small subset ``tests/cpu/test_tiny_pair.py`` re-measures: the first
    ``TEST_SUBSET_PROMPTS`` prompts of each set, ``TEST_SUBSET_NEW_TOKENS`` new tokens."""
    prompts = [p for texts in prompt_sets.values() for p in texts[:TEST_SUBSET_PROMPTS]]
    stats = acceptance(pair, pair.drafter, prompts, TEST_SUBSET_NEW_TOKENS, temperature=0.0, seed=0)
    return {"prompts": len(prompts), "max_new_tokens": TEST_SUBSET_NEW_TOKENS, "mean_accept_len": stats["mean_accept_len"]}


def training_markdown(train: dict) -> str:
    """The card's training summary from ``train_report.json``."""
    d, t, g, r = train["data"], train["target"], train["generation"], train["drafter"]
    first_t, last_t = t["history"][0], t["history"][-1]
    first_d, last_d = r["history"][0], r["history"][-1]
    ev = r["heldout_teacher_forced"]
    return "\n".join([
        f"Run: `{train['command']}` on {train['device']} ({train['date']}, commit {train['git_commit'][:12]}, "
        f"Python {train['versions']['python']}, torch {train['versions']['torch']}, seed {train['seed']}); "
        f"phases (s): {train['phases_s']}, total {train['total_s']} s.",
        "",
        f"- Data: {d['train_files']} train / {d['heldout_files']} held-out stdlib files ({d['stdlib']}), "
        f"{d['train_tokens']:,} / {d['heldout_tokens']:,} tokens, {d['heldout_bytes_per_token']} bytes per token.",
        f"- Target: {t['parameters']:,} parameters, {t['steps']} steps of {t['batch'][0]} x {t['batch'][1]} tokens "
        f"({t['stopped_by']}), train loss {first_t['loss']} -> {last_t['loss']}; held-out loss "
        f"{t['heldout_loss_init']} (init) -> **{t['heldout_loss']} nats/token** ({t['heldout_bits_per_byte']} bits/byte).",
        f"- Drafter data: {g['sequences']:,} target continuations ({g['prompt_tokens']} prompt + {g['new_tokens']} "
        f"new tokens, temperatures {g['temperatures']}).",
        f"- Drafter: {r['parameters']:,} parameters, {r['steps']} steps of {r['batch'][0]} sequences x "
        f"{r['config']['block_size']}-slot blocks ({r['stopped_by']}); loss {first_d['total']} -> {last_d['total']} "
        f"(ce {last_d['ce']}, l1 {last_d['l1']}, conf {last_d.get('conf')}).",
        f"- Held-out teacher-forced (generated continuations): tau_prob {ev['heldout_generated']['tau_prob']}, "
        f"greedy tau {ev['heldout_generated']['tau_greedy']}; without Markov head: tau_prob "
        f"{ev['heldout_generated_no_markov']['tau_prob']}, greedy tau {ev['heldout_generated_no_markov']['tau_greedy']}.",
        f"- Fixture size: {train['export']['fixture_bytes']:,} bytes (limit {train['export']['limit']:,}).",
    ])


def results_markdown(report: dict, train: dict | None = None) -> str:
    """The card's results section from an evaluation report (and the training report, if given)."""
    lines = []
    if train is not None:
        lines += ["### Training", "", training_markdown(train), "", "### Acceptance", ""]
    lines += [
        f"Reference loop on CPU (`benchmark/tiny/evaluate.py`), gamma 7, {report['max_new_tokens']} new tokens "
        f"per prompt, seed {report['seed']}; acceptance length = committed tokens per verify step, bonus "
        "included, pooled over all steps; position j = share of steps whose j-th draft was accepted.",
        "",
        "| mode | prompts | accept len | per-position acceptance (1..7) |",
        "|---|---|---|---|",
    ]
    for mode, sets in report["results"].items():
        for name, s in sets.items():
            pos = " / ".join(f"{100 * x:.0f}" for x in s["per_position"])
            lines.append(f"| {mode} | {name} ({s['prompts']}) | **{s['mean_accept_len']:.2f}** | {pos} % |")
    conf = {n: s.get("confidence_mean_per_position") for n, s in report["results"].get("temp1", {}).items()}
    if conf and all(conf.values()):
        lines += ["", "Confidence head at temperature 1.0 (mean sigmoid vs observed conditional acceptance, "
                  "positions 1..7):", ""]
        for name, s in report["results"]["temp1"].items():
            pred = " / ".join(f"{x:.2f}" for x in s["confidence_mean_per_position"])
            obs = " / ".join(f"{x:.2f}" for x in s["conditional_per_position"])
            lines.append(f"- {name}: predicted {pred}; observed {obs}")
    subset = report.get("test_subset")
    if subset:
        lines += ["", f"CPU test subset (`tests/cpu/test_tiny_pair.py`, greedy, first {TEST_SUBSET_PROMPTS} prompts "
                  f"of each set, {subset['max_new_tokens']} new tokens): accept len {subset['mean_accept_len']:.3f}."]
    return "\n".join(lines)


def update_card(card: Path, markdown: str) -> None:
    text = card.read_text()
    pattern = re.compile(re.escape(CARD_BEGIN) + ".*?" + re.escape(CARD_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"evaluate.py: {card} has no {CARD_BEGIN} ... {CARD_END} section to replace")
    card.write_text(pattern.sub(lambda _: f"{CARD_BEGIN}\n{markdown}\n{CARD_END}", text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=TARGET_DIR)
    parser.add_argument("--draft", type=Path, default=DRAFT_DIR)
    parser.add_argument("--humaneval", type=Path, default=HUMANEVAL_PROMPTS)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for these tiny matmuls, and avoids contention)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the JSON report here (the committed one is <target>/eval_report.json)")
    parser.add_argument("--card", type=Path, default=None, help="replace the results section of this model card")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    pair = load_pair(args.target, args.draft)
    sets = load_prompts(args.target, args.humaneval)
    if args.limit is not None:
        sets = {k: v[: args.limit] for k, v in sets.items()}
    results = evaluate(pair, sets, args.max_new_tokens, args.seed)
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "gamma": 7,
        "results": results,
    }
    report["test_subset"] = band_subset_acceptance(pair, load_prompts(args.target, args.humaneval))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    train_report = args.target / "train_report.json"
    markdown = results_markdown(report, json.loads(train_report.read_text()) if train_report.is_file() else None)
    if args.card:
        update_card(args.card, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
