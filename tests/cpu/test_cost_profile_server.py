"""``python -m sglang_dspark.cost_profile server``: start a server that measures its own cost profile, take the
file it writes, stop it (here a stand-in launcher replaces ``sglang.launch_server``)."""

from __future__ import annotations

import sys
import time

import pytest

from sglang_dspark.cost_profile import CostProfile, CostProfileError, profile_from_server

FLAGS = ["--model-path", "m", "--speculative-algorithm", "DSPARK", "--speculative-draft-model-path", "d"]
# Writes a profile where the server would, records its argv, then serves "forever" (until stopped).
WRITER = """
import json, os, sys, time
open(os.environ["SGLANG_DSPARK_COST_PROFILE_OUT"] + ".argv", "w").write(json.dumps(sys.argv[1:]))
time.sleep(0.3)
json.dump({"format": "sglang-dspark-cost-profile", "version": 1, "points": [[1, 5.0], [64, 6.0]],
           "draft_points": [[1, 1.0]], "source": "measured"}, open(os.environ["SGLANG_DSPARK_COST_PROFILE_OUT"], "w"))
time.sleep(600)
"""


def test_profile_from_server_takes_the_file_and_stops_the_server(tmp_path):
    out = tmp_path / "new-dir" / "cost.json"  # its folder is made (the server log goes there first)
    start = time.monotonic()
    profile = profile_from_server(out, FLAGS, timeout_s=60, launcher=[sys.executable, "-c", WRITER])
    assert time.monotonic() - start < 30  # stopped, not waited for
    assert profile.points == ((1, 5.0), (64, 6.0)) and CostProfile.load(out).points == profile.points
    argv = (out.parent / "cost.json.argv").read_text()
    assert argv.endswith('"DSPARK", "--speculative-draft-model-path", "d", "--speculative-dspark-cost-profile", "auto"]')


def test_profile_from_server_errors_name_the_log(tmp_path):
    out = tmp_path / "cost.json"
    with pytest.raises(CostProfileError, match=r"exited with 3 before writing .*cost.json \(log: .*cost.json.server.log\)"):
        profile_from_server(out, FLAGS, timeout_s=60, launcher=[sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(CostProfileError, match="no cost profile in .* after 1 s"):
        profile_from_server(out, FLAGS, timeout_s=1, launcher=[sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(CostProfileError, match="pass the DSPARK launch flags"):
        profile_from_server(out, ["--model-path", "m"])
