"""A one-minute version of bench/chaos.py: mixed load while shard actors and Serve replicas are
killed, then every accepted event checked against a batch rebuild (the bench runs ten minutes)."""

import sys
from pathlib import Path

import pytest
from conftest import serve_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import chaos  # noqa: E402  (bench/ is a folder of scripts, not a package)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_minute_of_chaos_loses_no_accepted_event_and_answers_only_as_documented(tiny_work, tmp_path, serve_url):
    cfg = serve_config(tiny_work, tmp_path, num_shards=2)
    (tmp_path / "token").write_text("chaos-token")
    settings = chaos.Settings(seconds=60, calm_seconds=10, event_rate=150, users=120, doomed=6, read_rate=30,
                              kill_every=(8, 14))
    report = chaos.run_chaos(cfg, settings, serve_url)
    chaos.print_report(report, settings)
    assert len(report["kills"]) >= 3
    assert report["accepted_events"] > 2000
    problems = (report["lost"], report["applied_twice"], report["mismatched_profiles"], report["wrong_shard"])
    assert problems == (0, 0, 0, 0)
    assert (report["deleted"], report["deleted_still_held"], report["deleted_still_in_files"]) == (6, 0, 0)
    assert report["unexpected"] == 0, report["unexpected_examples"]
    # only a killed Ingress replica may cut requests off (Serve's proxy then answers 500)
    assert report["cut_by_replica_death"] == 0 or any(kind == "Ingress" for _, kind, _ in report["kills"])
