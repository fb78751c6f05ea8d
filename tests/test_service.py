"""The Ray Serve application over real HTTP on localhost."""

import dataclasses
import os
import time

import numpy as np
import pytest
import requests
from conftest import serve_config
from profilerec.data.datasets import read_prepared
from profilerec.data.schema import events_from_table
from profilerec.data.storage import read_table
from profilerec.model.profile import states_from_table
from profilerec.service.shard import DEDUP_WINDOW, shard_of
from profilerec.service.shard_actors import NAMESPACE, load_serving_recommender, shard_actor_name

# the service runs on Ray Serve over the tiny_work folder
pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = "test-token-123"
APP = "svc"


@pytest.fixture(scope="module")
def service(tiny_work, tmp_path_factory, serve_url):
    """The service with two-stage retrieval from tiny_work's index, with so few candidates that
    they are a small part of the catalog (every item is scored in test_pipeline.py's service)."""
    from profilerec.config import RetrievalConfig
    from profilerec.service.api import build_app
    from ray import serve

    state = tmp_path_factory.mktemp("serve_state")
    (state / "token").write_text(TOKEN)
    retrieval = RetrievalConfig(mode="two_stage", index=str(tiny_work / "index"), nearest=20, popular=5)
    cfg = serve_config(tiny_work, state, num_shards=2, retrieval=retrieval)
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield {"url": serve_url, "cfg": cfg}
    serve.delete(APP)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(service, events, headers=AUTH):
    return requests.post(f"{service['url']}/v1/events", json={"events": events}, headers=headers, timeout=60)


def recs(service, user, **params):
    r = requests.get(f"{service['url']}/v1/users/{user}/recommendations", params=params, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def item_ids(service):
    data = read_prepared(service["cfg"].prepared)
    return data.items.column("item_id").to_pylist()


def test_cold_user_gets_the_popularity_ranking(service):
    popularity = read_table(f"{service['cfg'].profiles}/popularity.parquet").to_pandas()
    best = popularity.sort_values("count", ascending=False).iloc[0]
    out = recs(service, "nobody-yet", k=5)
    assert out["cold_start"] is True and len(out["items"]) == 5
    assert out["items"][0]["score"] == pytest.approx(np.log1p(best["count"]), rel=1e-5)


def test_events_move_the_recommendations_and_repeats_change_nothing(service):
    items = item_ids(service)
    before = recs(service, "mover", k=5)
    events = [{"event_id": f"mv-{n}", "user_id": "mover", "item_id": items[n], "type": "purchase",
               "ts": 1_700_000_000 + n} for n in range(3)]
    r = post(service, events)
    assert r.status_code == 200 and r.json() == {"accepted": 3, "duplicates": 0}
    after = recs(service, "mover", k=5)
    assert after["cold_start"] is False
    assert [i["item_id"] for i in after["items"]] != [i["item_id"] for i in before["items"]]
    assert post(service, events).json() == {"accepted": 0, "duplicates": 3}
    assert recs(service, "mover", k=5) == after
    unseen = recs(service, "mover", k=5, exclude_seen="true")
    assert not {i["item_id"] for i in unseen["items"]} & set(items[:3])


@pytest.mark.parametrize("mutate, field", [
    (lambda e: e.update(colour="red"), "colour"),
    (lambda e: e.update(type="teleport"), "type"),
    (lambda e: e.update(item_id="no-such-item"), "item_id"),
    (lambda e: e.update(ts="yesterday-ish"), "ts"),
    (lambda e: e.update(value="five"), "value"),
    (lambda e: e.pop("user_id"), "user_id"),
    (lambda e: e.update(text="x" * 10_001), "text"),
    (lambda e: e.update(ts=time.time() + 3600), "ts"),  # more than max_ahead_s after the service's clock
])
def test_bad_events_get_a_4xx_naming_the_field_and_nothing_is_applied(service, mutate, field):
    items = item_ids(service)
    good = {"event_id": "ok-1", "user_id": "strict", "item_id": items[0], "type": "click", "ts": 1_700_000_000}
    bad = {"event_id": "bad-1", "user_id": "strict", "item_id": items[1], "type": "click", "ts": 1_700_000_001}
    mutate(bad)
    r = post(service, [good, bad])
    assert r.status_code == 422, r.text
    assert field in str(r.json()["detail"]), r.text
    assert "Traceback" not in r.text
    assert requests.get(f"{service['url']}/v1/users/strict/profile", timeout=60).status_code == 404


def test_a_batch_with_more_events_of_one_user_than_a_retry_is_recognised_by_is_refused(service):
    items = item_ids(service)
    batch = [{"event_id": f"many-{n}", "user_id": "many", "item_id": items[n % len(items)], "type": "view",
              "ts": 1_700_000_000 + n} for n in range(DEDUP_WINDOW + 1)]
    r = post(service, batch)
    assert r.status_code == 422 and f"at most {DEDUP_WINDOW} per user" in r.text, r.text
    assert post(service, batch[:DEDUP_WINDOW]).json() == {"accepted": DEDUP_WINDOW, "duplicates": 0}
    assert post(service, batch[:DEDUP_WINDOW]).json() == {"accepted": 0, "duplicates": DEDUP_WINDOW}


def test_malformed_requests_get_4xx(service):
    url = service["url"]
    assert requests.post(f"{url}/v1/events", data=b"{not json", headers=AUTH, timeout=60).status_code == 422
    assert post(service, []).status_code == 422
    too_many = [{"event_id": f"x{n}", "user_id": "u", "item_id": item_ids(service)[0], "type": "view"}
                for n in range(1001)]
    assert post(service, too_many).status_code == 422
    assert requests.get(f"{url}/v1/users/u/recommendations", params={"k": 0}, timeout=60).status_code == 422
    assert requests.get(f"{url}/v1/users/u/recommendations", params={"k": "ten"}, timeout=60).status_code == 422
    assert requests.get(f"{url}/v1/users/{'u' * 300}/recommendations", timeout=60).status_code == 422
    huge = requests.post(f"{url}/v1/events", data=b" " * (4 * 1024 * 1024 + 1), headers=AUTH, timeout=60)
    assert huge.status_code == 413 and "larger than" in huge.text
    streamed = requests.post(f"{url}/v1/events", data=iter([b" " * (3 * 1024 * 1024)] * 2), headers=AUTH, timeout=60)
    assert streamed.status_code == 413 and "larger than" in streamed.text  # chunked: no length announced


def test_writes_need_the_bearer_token(service):
    event = [{"event_id": "auth-1", "user_id": "a", "item_id": item_ids(service)[0], "type": "view"}]
    assert post(service, event, headers={}).status_code == 401
    assert post(service, event, headers={"Authorization": "Bearer wrong"}).status_code == 403
    r = requests.delete(f"{service['url']}/v1/users/a", timeout=60)
    assert r.status_code == 401


def test_profile_explains_and_delete_forgets(service):
    items = item_ids(service)
    post(service, [{"event_id": f"fg-{n}", "user_id": "forgetme", "item_id": items[5 + n], "type": "cart",
                    "ts": 1_700_000_000 + n} for n in range(2)])
    profile = requests.get(f"{service['url']}/v1/users/forgetme/profile", timeout=60).json()
    assert [e["item_id"] for e in profile["recent_events"]] == [items[6], items[5]]
    assert len(profile["recommended_because"]) == 3
    r = requests.delete(f"{service['url']}/v1/users/forgetme", headers=AUTH, timeout=60)
    assert r.json() == {"user_id": "forgetme", "forgotten": True}
    assert requests.get(f"{service['url']}/v1/users/forgetme/profile", timeout=60).status_code == 404
    assert recs(service, "forgetme")["cold_start"] is True
    for root, _, files in os.walk(service["cfg"].state_dir):  # no log or snapshot keeps the user
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert b"forgetme" not in f.read(), os.path.join(root, name)


def test_an_id_with_a_slash_or_in_another_spelling_is_one_user_on_every_route(service):
    """Every user id POST /v1/events accepts can be read and deleted: ids holding "/" (sent as %2F
    or as is), and the NFD or padded spellings of an id, which name its NFC form (test_ids.py)."""
    url, items = service["url"], item_ids(service)
    r = post(service, [{"event_id": "sl-1", "user_id": " team/cafe\u0301 ", "item_id": items[3], "type": "purchase",
                        "ts": 1_700_000_000}])
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    for path in ("team%2Fcaf%C3%A9", "team/caf%C3%A9", "team%2Fcafe%CC%81"):
        got = requests.get(f"{url}/v1/users/{path}/recommendations", timeout=60)
        assert got.status_code == 200, got.text
        assert got.json()["user_id"] == "team/café" and got.json()["cold_start"] is False
    profile = requests.get(f"{url}/v1/users/team%2Fcaf%C3%A9/profile", timeout=60)
    assert profile.status_code == 200 and [e["item_id"] for e in profile.json()["recent_events"]] == [items[3]]
    r = requests.delete(f"{url}/v1/users/team%2Fcafe%CC%81", headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json() == {"user_id": "team/café", "forgotten": True}, r.text
    assert requests.get(f"{url}/v1/users/team%2Fcaf%C3%A9/profile", timeout=60).status_code == 404
    blank = requests.get(f"{url}/v1/users/%20/profile", timeout=60)
    assert blank.status_code == 422 and "user_id" in blank.text and "Traceback" not in blank.text


def test_put_items_adds_them_to_every_shard_with_no_restart(service):
    from profilerec.data.schema import item_text
    from profilerec.model.encoder import TextEncoder

    url = service["url"]
    source = read_prepared(service["cfg"].prepared).items.slice(0, 1).to_pylist()[0]
    fields = {k: source[k] for k in ("title", "description", "brand", "categories") if source[k]}
    fresh = [{"item_id": "fresh-1", **fields}, {"item_id": "fresh-2", "title": "Stainless steel hex bolts, M8, box of 100"}]
    assert requests.put(f"{url}/v1/items", json={"items": fresh}, timeout=60).status_code == 401
    r = requests.put(f"{url}/v1/items", json={"items": fresh}, headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json() == {"upserted": 2, "new": 2}, r.text
    # events may name the new items at once; the profile and recommendations use their vectors
    assert post(service, [{"event_id": "fr-1", "user_id": "fresh-fan", "item_id": "fresh-2", "type": "purchase",
                           "ts": 1_700_000_000}]).status_code == 200
    got = recs(service, "fresh-fan", k=200)["items"]
    local = load_serving_recommender(service["cfg"])  # the prepared items plus the durable catalog
    assert local.index.row("fresh-2") == len(local.index) - 1
    text = item_text(fresh[1]["title"], None, None, None)
    np.testing.assert_allclose(local.index.vector("fresh-2"), TextEncoder().encode([text])[0], atol=1e-5)
    expected = local.recommend(local_state(service, "fresh-fan"), k=200)
    assert [i["item_id"] for i in got] == [i["item_id"] for i in expected]
    assert {"fresh-1", "fresh-2"} <= {i["item_id"] for i in got}
    bad = requests.put(f"{url}/v1/items", json={"items": [{"item_id": "x"}]}, headers=AUTH, timeout=60)
    assert bad.status_code == 422 and "title" in bad.text
    twice = requests.put(f"{url}/v1/items", json={"items": [fresh[1], fresh[1]]}, headers=AUTH, timeout=60)
    assert twice.status_code == 422 and "twice" in twice.text


def test_an_event_text_no_one_encoded_yet_moves_the_profile(service):
    from profilerec.model.encoder import TextEncoder
    from profilerec.model.profile import interest_vectors

    text = "cordless drill with two lithium batteries and a hard case"
    r = post(service, [{"event_id": "tx-1", "user_id": "searcher", "type": "search", "text": text,
                        "ts": 1_700_000_000}])
    assert r.status_code == 200, r.text
    served = recs(service, "searcher", k=10)
    assert served["cold_start"] is False
    state = local_state(service, "searcher")
    long, _ = interest_vectors(state)
    np.testing.assert_allclose(long, TextEncoder().encode([text])[0], atol=2e-3)
    local = load_serving_recommender(service["cfg"])  # the encode job's texts plus the durable log
    expected = local.recommend(state, k=10)
    assert [i["item_id"] for i in served["items"]] == [i["item_id"] for i in expected]


def local_state(service, user):
    """The user's state as its shard actor holds it."""
    import ray

    actor = ray.get_actor(shard_actor_name(APP, shard_of(user, 2), 2), namespace=NAMESPACE)
    return next(s for s in states_from_table(ray.get(actor.state_table.remote())) if s.user_id == user)


def test_health(service):
    r = requests.get(f"{service['url']}/healthz", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["shards"] == 2


def test_profiles_built_event_by_event_in_the_service_equal_the_batch_job(service, ray_session):
    """The whole log of a few users, posted in small batches, gives the batch job's states."""
    data = read_prepared(service["cfg"].prepared)
    by_user = {}
    for event in events_from_table(data.events):
        by_user.setdefault(event.user_id, []).append(event)
    users = list(by_user)[:6]
    stream = [e for u in users for e in by_user[u]]
    for start in range(0, len(stream), 7):
        batch = [{k: v for k, v in dataclasses.asdict(e).items() if v is not None} for e in stream[start:start + 7]]
        assert post(service, batch).status_code == 200
    batch_states = {s.user_id: s for s in states_from_table(read_table(f"{service['cfg'].profiles}/states.parquet"))}
    served = {}
    for shard in range(2):
        actor = ray_session.get_actor(shard_actor_name(APP, shard, 2), namespace=NAMESPACE)
        served.update({s.user_id: s for s in states_from_table(ray_session.get(actor.state_table.remote()))})
    for user in users:
        live, batch = served[user], batch_states[user]
        np.testing.assert_allclose(live.long_sum, batch.long_sum, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(live.short_sum, batch.short_sum, rtol=1e-6, atol=1e-7)
        assert live.recent == batch.recent and live.n_events == batch.n_events
        assert live.long_weight == pytest.approx(batch.long_weight)
        assert live.counters == pytest.approx(batch.counters)
    # and what the service recommends is what the evaluated model gives for the batch-built profile,
    # scored by the ingress from the states the shards put on their boards (profile_board.py)
    recommender = load_serving_recommender(service["cfg"])
    assert recommender.scorer is not None and recommender.retrieval is not None
    board_reads = requests.get(f"{service['url']}/healthz", timeout=60).json()["replica_reads"]["board"]
    for user in users:
        expected = recommender.recommend(batch_states[user], k=5)
        got = recs(service, user, k=5)["items"]
        assert [i["item_id"] for i in got] == [i["item_id"] for i in expected]
        assert [i["score"] for i in got] == pytest.approx([i["score"] for i in expected], rel=1e-5, abs=1e-5)
    assert requests.get(f"{service['url']}/healthz", timeout=60).json()["replica_reads"]["board"] == board_reads + len(users)
