"""DSPARK on a trained target/draft pair vs the no-speculation server and vs the reference implementation.

    python tests/gpu/fixture_pair.py [TARGET_DIR [DRAFT_DIR [MAX_NEW_TOKENS]]]

Defaults: ``tests/fixtures/tiny-qwen3`` (an HF Qwen3 checkpoint) and ``tests/fixtures/tiny-qwen3-dspark``
(a DSpark draft, either layout), 64 new tokens. Prompts: the first ``N_PROMPTS`` lines of
``TARGET_DIR/heldout_prompts.jsonl`` (field ``prompt`` or ``text``) tokenized with the target's tokenizer
when both exist, else random token ids. Greedy decoding:

* SGLang DSPARK outputs vs SGLang without speculation (token-identical expected; a divergence is reported
  with its position, since a near-tie in a trained model can flip between two kernels);
* per prompt, the verify steps SGLang took (``meta_info.spec_verify_ct``) vs the reference
  (``sglang_dspark.reference.decode.speculative_generate`` with the HF target, on the GPU), on prompts where
  both produced the same tokens: the draft path (backbone over injected context K/V, Markov head) must
  accept what the reference accepts;
* ``/server_info`` ``avg_spec_accept_length``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Report, Server  # noqa: E402

N_PROMPTS = 12
GREEDY_STEPS_TOLERANCE = 0.05  # relative difference of total verify steps, SGLang vs reference


def load_prompts(target: Path, vocab: int) -> list[list[int]]:
    path = target / "heldout_prompts.jsonl"
    if path.exists() and (target / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target)
        texts = []
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            text = record.get("prompt") or record.get("text")
            if text:
                texts.append(text)
        if texts:
            return [tokenizer.encode(text) for text in texts[:N_PROMPTS]]
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(rng.randint(16, 200))] for _ in range(N_PROMPTS)]


def reference_runs(target_dir: Path, draft_dir: Path, prompts: list[list[int]], n_out: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from sglang_dspark.checkpoint import load_draft
    from sglang_dspark.reference.decode import speculative_generate
    from sglang_dspark.reference.drafter import DSparkDrafter

    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16).cuda().eval()
    draft = load_draft(draft_dir, target_config=target.config, dtype=torch.bfloat16)
    drafter = DSparkDrafter(draft.config, dtype=torch.bfloat16).cuda().eval()
    drafter.load_state_dict(draft.weights, strict=True)
    runs = []
    for prompt in prompts:
        result = speculative_generate(target, drafter, torch.tensor(prompt).cuda(), n_out)
        runs.append({"tokens": result.tokens, "steps": len(result.committed_per_step),
                     "accepted_per_position": result.accepted_per_position})
    return runs


def main(target_dir: Path, draft_dir: Path, n_out: int) -> int:
    report = Report("gpu-fixture")
    report.data["results"]["fixture"] = {"target": str(target_dir), "draft": str(draft_dir)}
    vocab = json.loads((target_dir / "config.json").read_text())["vocab_size"]
    prompts = load_prompts(target_dir, vocab)
    greedy = {"temperature": 0.0, "max_new_tokens": n_out, "ignore_eos": True}

    def serve(name: str, port: int, extra: list[str]) -> dict:
        with Server(name, target_dir, extra, port) as server:
            server.generate_many(prompts[:2], [greedy] * 2, 2)
            c1 = server.generate_many(prompts, [greedy] * len(prompts), 1)
            c8 = server.generate_many(prompts, [greedy] * len(prompts), 8)
            info = {"server": server.describe(), "c1": c1, "c8": c8}
            if extra:
                info["avg_spec_accept_length"] = server.avg_spec_accept_length()
            return info

    baseline = report.run("baseline server", lambda: serve("fixture-baseline", 32001, []))
    dspark = report.run("dspark server", lambda: serve(
        "fixture-dspark", 32002,
        ["--speculative-algorithm", "DSPARK", "--speculative-draft-model-path", str(draft_dir)]))
    reference = report.run("reference", lambda: reference_runs(target_dir, draft_dir, prompts, n_out))
    if baseline is None or dspark is None:
        report.write()
        return 1

    base = [r["output_ids"] for r in baseline["c1"]]
    for run in ("c1", "c8"):
        got = [r["output_ids"] for r in dspark[run]]
        diverged = [{"prompt": i, "first_diff": next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))}
                    for i, (g, w) in enumerate(zip(got, base)) if g != w]
        report.check(f"dspark {run}: greedy outputs identical to the no-speculation server", not diverged, diverged or None)
    avg = dspark["avg_spec_accept_length"]
    report.check("dspark: avg_spec_accept_length > 1 (the drafter gets drafts accepted)", avg is not None and avg > 1.0, avg)

    results = {"avg_spec_accept_length": avg, "baseline_server": baseline["server"], "dspark_server": dspark["server"],
               "dspark_verify_ct": [r["meta_info"].get("spec_verify_ct") for r in dspark["c1"]]}
    if reference is not None:
        dspark_out = [r["output_ids"] for r in dspark["c1"]]
        same = [i for i, (r, d) in enumerate(zip(reference, dspark_out)) if r["tokens"] == d]
        results["reference_steps"] = [r["steps"] for r in reference]
        results["reference_same_tokens"] = same
        report.check("reference: same greedy tokens as SGLang DSPARK on most prompts", len(same) >= len(prompts) // 2,
                     f"{len(same)}/{len(prompts)}")
        if same:
            sgl = sum(results["dspark_verify_ct"][i] for i in same)
            ref = sum(reference[i]["steps"] for i in same)
            results["steps_on_same_prompts"] = {"sglang": sgl, "reference": ref}
            report.check(f"verify steps SGLang vs reference within {GREEDY_STEPS_TOLERANCE:.0%} (same-token prompts)",
                         abs(sgl - ref) <= GREEDY_STEPS_TOLERANCE * ref, {"sglang": sgl, "reference": ref})
    report.data["results"].update(results)
    report.write()
    return 0 if report.ok else 1


if __name__ == "__main__":
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    target_arg = Path(sys.argv[1]) if len(sys.argv) > 1 else fixtures / "tiny-qwen3"
    draft_arg = Path(sys.argv[2]) if len(sys.argv) > 2 else fixtures / "tiny-qwen3-dspark"
    sys.exit(main(target_arg.resolve(), draft_arg.resolve(), int(sys.argv[3]) if len(sys.argv) > 3 else 64))
