"""Losing the node the profile shards run on, with the state in a bucket (bench/node_loss.py in a
process of its own: it starts a two-node Ray cluster, which cannot share this session's Ray)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "node_loss.py"


def test_shards_move_to_the_remaining_node_and_no_accepted_event_is_lost(tiny_work):
    folders = {name: str(tiny_work / name) for name in ("prepared", "embeddings", "model", "profiles")}
    run = subprocess.run([sys.executable, str(SCRIPT), "--json", "--before_s", "10", "--after_s", "40", "--users", "20",
                          *(f"--{k}={v}" for k, v in folders.items())], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(result)
    assert result["shards_on_removed_node"] == 2 and result["shards_on_removed_node_after"] == 0
    assert result["batches_after_loss"] > 0 and result["first_write_after_loss_s"] is not None
    assert result["accepted_events"] > 100
    assert (result["lost"], result["mismatched_profiles"]) == (0, 0)
