"""Diagnosis of the serving suite's chat n=2 prompt (texts[1], 64 greedy tokens), whose two DSPARK copies once
differed: is it a tie of the target? (benchmark/results/diag-chat-n2.json)

    bash tests/gpu/run.sh setup && python3 tests/gpu/diag_chat_n2.py        (on the GPU machine)

No-spec (``base``), DSPARK scheduled (``sched``) and DSPARK with full verification (``full``), flags as the
serving suite's servers: chat n=2 twice, chat n=1, /generate n=2 and n=1 on the chat's prompt ids; every output
against no-spec's /generate n=1, a difference with no-spec's top-20 logprobs of both tokens at its first position.
Writes ``$OUT/diag-chat-n2.json``.
"""
import json
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import OUT, TINY_TARGET, Server  # noqa: E402
from serving import DSPARK_ARGS, PAIR_ARGS, TINY_ARGS, load_prompts  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(TINY_TARGET)
texts, _, _ = load_prompts(tok)
logs = Path("/tmp/diag-logs")
servers = {
    name: Server(f"diag-{name}", TINY_TARGET, [*TINY_ARGS, *PAIR_ARGS, *extra], port, skip_tokenizer_init=False,
                 log_dir=logs)
    for name, extra, port in (("base", [], 31500), ("sched", DSPARK_ARGS, 31600),
                              ("full", [*DSPARK_ARGS, "--speculative-dspark-verify", "full"], 31700))
}
out = {}
try:
    for s in servers.values():
        s.start()
        time.sleep(2)
    for s in servers.values():
        s.wait_ready()

    def post(name, path, payload):
        return requests.post(servers[name].url + path, json=payload, timeout=60).json()

    def flush(name):
        requests.post(servers[name].url + "/flush_cache?timeout=10", timeout=30)

    def gap(context, a, b):
        body = post("base", "/generate", {"input_ids": context, "return_logprob": True, "top_logprobs_num": 20,
                                          "sampling_params": {"temperature": 0.0, "max_new_tokens": 1},
                                          "logprob_start_len": -1})
        lps = {int(e[1]): float(e[0]) for e in body["meta_info"]["output_top_logprobs"][0]}
        return {"a": a, "b": b, "lp_a": lps.get(a), "lp_b": lps.get(b), "top1": max(lps.values())}

    chat = {"model": "default", "messages": [{"role": "user", "content": texts[1]}], "max_tokens": 64,
            "temperature": 0, "ignore_eos": True, "n": 2, "return_prompt_token_ids": True}
    prompt_ids = None
    for name in ("base", "sched", "full"):
        rec = out[name] = {}
        runs = []
        for _ in range(2):
            flush(name)
            c = post(name, "/v1/chat/completions", chat)
            runs.append([ch["message"]["content"] for ch in c["choices"]])
            prompt_ids = c["choices"][0].get("prompt_token_ids") or prompt_ids
        rec["chat_n2"] = runs
        flush(name)
        rec["chat_n1"] = post(name, "/v1/chat/completions", {**chat, "n": 1})["choices"][0]["message"]["content"]
        gens = []
        for n in (2, 1):
            flush(name)
            params = {"n": n, "temperature": 0, "max_new_tokens": 64, "ignore_eos": True}
            g = post(name, "/generate", {"input_ids": prompt_ids, "sampling_params": params})
            g = g if isinstance(g, list) else [g]
            gens.append([x["output_ids"] for x in g])
            if n == 2:
                rec["gen_n2_verify_ct"] = [x["meta_info"].get("spec_verify_ct") for x in g]
        rec["gen_n2"], rec["gen_n1"] = gens
    ref = out["base"]["gen_n1"][0]
    for name in out:
        for j, ids in enumerate(out[name]["gen_n2"] + out[name]["gen_n1"]):
            d = next((i for i, (x, y) in enumerate(zip(ids, ref)) if x != y), None)
            diff = None if d is None else {"pos": d, **gap(prompt_ids + ref[:d], ids[d], ref[d])}
            out[name][f"diff_vs_base_{j}"] = diff
    out["prompt_len"] = len(prompt_ids)
finally:
    for s in servers.values():
        s.stop()
    Path(OUT).mkdir(parents=True, exist_ok=True)
    (Path(OUT) / "diag-chat-n2.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=0)[:6000])
