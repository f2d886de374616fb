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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import OUT, TINY_TARGET, Clock, Server, first_difference  # noqa: E402
from serving import DSPARK_ARGS, PAIR_ARGS, TINY_ARGS, Api, Judge, greedy, ids_of, load_prompts  # noqa: E402
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
clock = Clock("DIAG_T0", 600.0)
apis = {name: Api(server, clock) for name, server in servers.items()}
judge = Judge(apis["base"], strict=False)
out = {}
try:
    for s in servers.values():
        s.start()
        time.sleep(2)
    for s in servers.values():
        s.wait_ready()

    chat = {"model": "default", "messages": [{"role": "user", "content": texts[1]}], "max_tokens": 64,
            "temperature": 0, "ignore_eos": True, "n": 2, "return_prompt_token_ids": True}
    prompt_ids = None
    for name, api in apis.items():
        rec = out[name] = {}
        runs = []
        for _ in range(2):
            api.flush()
            c = api.ok("/v1/chat/completions", chat)
            runs.append([ch["message"]["content"] for ch in c["choices"]])
            prompt_ids = c["choices"][0].get("prompt_token_ids") or prompt_ids
        rec["chat_n2"] = runs
        api.flush()
        rec["chat_n1"] = api.ok("/v1/chat/completions", {**chat, "n": 1})["choices"][0]["message"]["content"]
        gens = []
        for n in (2, 1):
            g = api.generate({"input_ids": prompt_ids, "sampling_params": {**greedy(64), "n": n}}, cold=True)
            g = g if isinstance(g, list) else [g]
            gens.append([ids_of(x) for x in g])
            if n == 2:
                rec["gen_n2_verify_ct"] = [x["meta_info"].get("spec_verify_ct") for x in g]
        rec["gen_n2"], rec["gen_n1"] = gens
    ref = out["base"]["gen_n1"][0]
    for name in apis:
        for j, ids in enumerate(out[name]["gen_n2"] + out[name]["gen_n1"]):
            d = first_difference(ids, ref)
            out[name][f"diff_vs_base_{j}"] = None if d is None else {
                "pos": d, "a": ids[d], "b": ref[d], **judge.gap(prompt_ids + ref[:d], ids[d], ref[d])}
    out["prompt_len"] = len(prompt_ids)
finally:
    for s in servers.values():
        s.stop()
    Path(OUT).mkdir(parents=True, exist_ok=True)
    (Path(OUT) / "diag-chat-n2.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=0)[:6000])
