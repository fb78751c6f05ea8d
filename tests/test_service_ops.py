"""Operating the service over real HTTP: a shard killed mid-stream, redeploys, a changed shard
count, overload, Prometheus metrics, and a fuzz test of the published OpenAPI spec."""

import os
import threading
import time

import pytest
import requests
import schemathesis
from conftest import fill, serve_config
from hypothesis import HealthCheck, given, settings
from profilerec.data.datasets import read_prepared
from profilerec.data.schema import Event
from profilerec.errors import ShardRetired
from profilerec.model.profile import build_profile, states_from_table
from profilerec.service.shard import ProfileShard, layout_root, repartition, shard_of
from profilerec.service.shard_actors import (
    NAMESPACE,
    load_serving_recommender,
    shard_actor_name,
    stop_application_actors,
)
from profilerec.service.shard_store import ShardStore

# the service runs on Ray Serve over the tiny_work folder
pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = "ops-token-456"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP = "ops"
PREFIX = "/ops"


def deploy(cfg, **ingress_options):
    from profilerec.service.api import build_app
    from ray import serve

    serve.run(build_app(cfg, **ingress_options), name=APP, route_prefix=PREFIX)


@pytest.fixture(scope="module")
def ops(tiny_work, tmp_path_factory, serve_url):
    from ray import serve

    state = tmp_path_factory.mktemp("ops_state")
    (state / "token").write_text(TOKEN)
    cfg = serve_config(tiny_work, state, num_shards=2, snapshot_every=40)
    deploy(cfg)
    items = read_prepared(cfg.prepared).items.column("item_id").to_pylist()
    yield {"url": serve_url + PREFIX, "cfg": cfg, "items": items}
    serve.delete(APP)


def wait_restarted(ray_session, actor, pid, timeout=120):
    """Wait until Ray has replaced the killed `actor` (its process id is no longer `pid`):
    `ray.kill` only asks, so a call made just after it may still reach the old process."""
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ray_session.get(actor.ping.remote()) != pid:
                return
        except RayActorError:
            pass  # between the old process and the new one
        time.sleep(0.1)
    raise AssertionError(f"the actor was not restarted within {timeout} s")


def post(ops, events):
    return requests.post(f"{ops['url']}/v1/events", json={"events": events}, headers=AUTH, timeout=120)


def event(ops, user, n):
    return {"event_id": f"{user}-{n}", "user_id": user, "item_id": ops["items"][(7 * n + len(user)) % len(ops["items"])],
            "type": ["view", "click", "cart", "purchase"][n % 4], "ts": 1_700_000_000 + 60 * n}


def recommended(ops, user):
    r = requests.get(f"{ops['url']}/v1/users/{user}/recommendations", params={"k": 10}, timeout=120)
    assert r.status_code == 200, r.text
    return [item["item_id"] for item in r.json()["items"]]


def live_states(ray, cfg):
    """Every user's state as the running shard actors hold it."""
    states = {}
    for shard in range(cfg.num_shards):
        actor = ray.get_actor(shard_actor_name(APP, shard, cfg.num_shards), namespace=NAMESPACE)
        states.update({s.user_id: s for s in states_from_table(ray.get(actor.state_table.remote()))})
    return states


def as_rows(states):
    from profilerec.model.profile import states_to_table

    return states_to_table(states[u] for u in sorted(states)).to_pylist()


def test_killing_a_shard_in_a_stream_of_events_loses_no_accepted_event(ops, ray_session):
    users = [f"stream-{n}" for n in range(6)]
    batches = [[event(ops, u, n) for u in users] for n in range(40)]
    answers = []

    def send():
        for batch in batches:
            r = post(ops, batch)
            answers.append((r.status_code, r.json()))

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 120
    while len(answers) < 8 and sender.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = ray_session.get_actor(shard_actor_name(APP, 0, 2), namespace=NAMESPACE)
    victims_users = [u for u in users if shard_of(u, 2) == 0]
    assert victims_users and all(recommended(ops, u) for u in victims_users)  # reads from its board
    pid = ray_session.get(victim.ping.remote())
    ray_session.kill(victim, no_restart=False)  # Ray restarts it; it recovers from snapshot + log
    sender.join()
    assert all(status == 200 for status, _ in answers), answers
    # a call cut off by the kill is retried: its events count once, as accepted or as repeats
    assert sum(a["accepted"] + a["duplicates"] for _, a in answers) == 6 * 40
    wait_restarted(ray_session, victim, pid)
    live = live_states(ray_session, ops["cfg"])
    recommender = load_serving_recommender(ops["cfg"])
    by_user = {u: [Event(**e) for b in batches for e in b if e["user_id"] == u] for u in users}
    expected = {u: build_profile(u, evs, recommender.vector_of, recommender.params, recommender.index.meta)
                for u, evs in by_user.items()}
    assert as_rows({u: live[u] for u in users}) == as_rows(expected)
    # reads find the restarted shard (its old board and socket are gone) and rank by the recovered profiles
    for u in users:
        assert recommended(ops, u) == [item["item_id"] for item in recommender.recommend(expected[u], 10)]
    # and the durable log alone rebuilds exactly what the actors hold
    root = layout_root(ops["cfg"].state_dir, 2)
    rebuilt = {}
    for shard in range(2):
        recovered = ProfileShard(shard, recommender, ShardStore(root, shard))
        rebuilt.update({u: recovered.state(u) for u in recovered.users})
    assert as_rows(rebuilt) == as_rows(live)


def test_a_redeploy_after_every_actor_is_gone_keeps_every_profile(ops, ray_session):
    from ray import serve

    post(ops, [event(ops, "redeploy-user", n) for n in range(5)])
    before = live_states(ray_session, ops["cfg"])
    serve.delete(APP)
    for shard in range(2):  # as after a cluster restart: nothing left in memory
        ray_session.kill(ray_session.get_actor(shard_actor_name(APP, shard, 2), namespace=NAMESPACE), no_restart=True)
    deploy(ops["cfg"])
    assert as_rows(live_states(ray_session, ops["cfg"])) == as_rows(before)
    assert post(ops, [event(ops, "redeploy-user", 4)]).json() == {"accepted": 0, "duplicates": 1}


def test_changing_the_shard_count_moves_every_profile_and_removes_the_old_layout(ops, ray_session):
    import dataclasses

    before = live_states(ray_session, ops["cfg"])
    recommended = requests.get(f"{ops['url']}/v1/users/stream-1/recommendations", timeout=60).json()
    three = dataclasses.replace(ops["cfg"], num_shards=3)
    deploy(three)
    after = live_states(ray_session, three)
    assert as_rows(after) == as_rows(before)
    for shard in range(3):
        actor = ray_session.get_actor(shard_actor_name(APP, shard, 3), namespace=NAMESPACE)
        held = states_from_table(ray_session.get(actor.state_table.remote()))
        assert all(shard_of(s.user_id, 3) == shard for s in held)
    assert not os.path.exists(layout_root(three.state_dir, 2))
    with pytest.raises(ValueError):
        ray_session.get_actor(shard_actor_name(APP, 0, 2), namespace=NAMESPACE)
    assert requests.get(f"{ops['url']}/v1/users/stream-1/recommendations", timeout=60).json() == recommended
    assert post(ops, [event(ops, "stream-1", 0)]).json() == {"accepted": 0, "duplicates": 1}
    deploy(ops["cfg"])  # back to two shards for the tests below
    assert as_rows(live_states(ray_session, ops["cfg"])) == as_rows(before)


def test_a_delete_during_a_move_gets_503_and_the_retry_after_the_move_forgets_the_user(ops, ray_session):
    import dataclasses

    post(ops, [event(ops, "moving-user", n) for n in range(3)])
    owner = ray_session.get_actor(shard_actor_name(APP, shard_of("moving-user", 2), 2), namespace=NAMESPACE)
    ray_session.get(owner.retire.remote())  # what the LayoutKeeper does first when the count changes
    r = requests.delete(f"{ops['url']}/v1/users/moving-user", headers=AUTH, timeout=60)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
    three = dataclasses.replace(ops["cfg"], num_shards=3)
    deploy(three)
    assert live_states(ray_session, three)["moving-user"].n_events == 3
    r = requests.delete(f"{ops['url']}/v1/users/moving-user", headers=AUTH, timeout=60)  # the client's retry
    assert r.json()["forgotten"] is True
    assert post(ops, [event(ops, "moving-user", 1)]).json() == {"accepted": 0, "duplicates": 1}  # a late retry
    deploy(ops["cfg"])
    assert "moving-user" not in live_states(ray_session, ops["cfg"])


def test_reverting_the_shard_count_mid_move_resumes_writes_and_removes_the_half_written_layout(ops, ray_session):
    from ray import serve

    cfg = ops["cfg"]
    post(ops, [event(ops, "revert-user", 0)])
    serve.delete(APP)
    # a move from 2 to 3 shards cut off half-way: the old shards retired, the new layout's files
    # written but not recorded as current
    for shard in range(2):
        ray_session.get(ray_session.get_actor(shard_actor_name(APP, shard, 2), namespace=NAMESPACE).retire.remote())
    repartition(cfg.state_dir, 2, 3, load_serving_recommender(cfg))
    owner = ray_session.get_actor(shard_actor_name(APP, shard_of("revert-user", 2), 2), namespace=NAMESPACE)
    pid = ray_session.get(owner.ping.remote())
    ray_session.kill(owner, no_restart=False)  # restarted in the middle of the move: still retired
    wait_restarted(ray_session, owner, pid)
    with pytest.raises(ShardRetired):
        ray_session.get(owner.apply.remote([Event(**event(ops, "revert-user", 1))]))
    deploy(cfg)  # the operator reverts to 2 shards
    assert post(ops, [event(ops, "revert-user", 1)]).json() == {"accepted": 1, "duplicates": 0}
    assert post(ops, [event(ops, "stream-0", 100)]).json() == {"accepted": 1, "duplicates": 0}
    assert not os.path.exists(layout_root(cfg.state_dir, 3))


def test_the_documented_restore_stops_the_shard_actors_and_serves_the_copy(ops, ray_session, tmp_path):
    import shutil

    from ray import serve

    cfg = ops["cfg"]
    assert post(ops, [event(ops, "restore-user", n) for n in range(2)]).status_code == 200
    serve.delete(APP)
    stopped = stop_application_actors(APP)
    assert shard_actor_name(APP, 0, 2) in stopped and f"{APP}-layout" in stopped
    shutil.copytree(cfg.state_dir, tmp_path / "backup")
    deploy(cfg)
    assert post(ops, [event(ops, "restore-user", 2)]).status_code == 200
    serve.delete(APP)
    stop_application_actors(APP)  # else the running shards keep, and snapshot over, the newer state
    shutil.rmtree(cfg.state_dir)
    shutil.copytree(tmp_path / "backup", cfg.state_dir)
    deploy(cfg)
    assert live_states(ray_session, cfg)["restore-user"].n_events == 2


def test_a_full_disk_gets_503_naming_the_cause_reads_go_on_and_writes_resume(ops, ray_session, small_disk):
    import dataclasses

    from profilerec.service.api import build_app
    from ray import serve

    cfg = dataclasses.replace(ops["cfg"], state_dir=str(small_disk / "state"))
    serve.run(build_app(cfg), name="disk", route_prefix="/disk")
    url = ops["url"].replace(PREFIX, "/disk")
    first = [event(ops, "disk-user", n) for n in range(3)]
    later = [event(ops, "disk-user", n) for n in range(3, 60)]
    try:
        assert requests.post(f"{url}/v1/events", json={"events": first}, headers=AUTH, timeout=60).status_code == 200
        filler = fill(small_disk)
        r = requests.post(f"{url}/v1/events", json={"events": later}, headers=AUTH, timeout=60)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
        assert "No space left on device" in r.json()["detail"]
        assert requests.get(f"{url}/v1/users/disk-user/recommendations", timeout=60).status_code == 200
        filler.unlink()
        r = requests.post(f"{url}/v1/events", json={"events": later}, headers=AUTH, timeout=60)
        assert r.json() == {"accepted": len(later), "duplicates": 0}
        owner = ray_session.get_actor(shard_actor_name("disk", shard_of("disk-user", 2), 2), namespace=NAMESPACE)
        held = {s.user_id: s for s in states_from_table(ray_session.get(owner.state_table.remote()))}
        assert held["disk-user"].n_events == 60
    finally:
        serve.delete("disk")
        stop_application_actors("disk")


def test_a_burst_beyond_capacity_gets_503_with_retry_after_and_the_service_recovers(ops):
    deploy(ops["cfg"], max_ongoing_requests=1, max_queued_requests=1)
    answers = []

    def ask():
        r = requests.get(f"{ops['url']}/v1/users/stream-2/recommendations", params={"k": 50}, timeout=60)
        answers.append((r.status_code, r.headers.get("Retry-After")))

    threads = [threading.Thread(target=ask) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [s for s, _ in answers]
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}, statuses
    assert all(retry == "1" for s, retry in answers if s == 503)
    assert requests.get(f"{ops['url']}/v1/users/stream-2/recommendations", timeout=60).status_code == 200
    deploy(ops["cfg"])


def test_metrics_reach_rays_prometheus_endpoint(ops, ray_session):
    post(ops, [event(ops, "metrics-user", n) for n in range(3)])
    requests.get(f"{ops['url']}/v1/users/metrics-user/recommendations", timeout=60)
    port = ray_session.nodes()[0]["MetricsExportPort"]
    wanted = ["ray_profilerec_events_accepted_total", "ray_profilerec_update_seconds_bucket",
              "ray_profilerec_recommendation_seconds_bucket", "ray_profilerec_users_held"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = [name for name in wanted if name not in text]
        if not missing:
            break
        time.sleep(3)
    assert not missing, f"not exported: {missing}"


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzing_the_published_openapi_spec_finds_no_5xx(ops, mode):
    """Requests generated from /openapi.json, valid ones and deliberately invalid ones, for every
    route: none may get a 5xx."""
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{ops['url']}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    fuzzed = []
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case):
            response = case.call(base_url=ops["url"], headers=AUTH)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"

        try:
            no_server_error()
        except Unsatisfiable:  # negative mode: a route without parameters has nothing to get wrong
            assert mode == "negative" and operation.path == "/healthz", operation.path
            continue
        fuzzed.append(f"{operation.method.upper()} {operation.path}")
    assert {"POST /v1/events", "PUT /v1/items"} <= set(fuzzed)
