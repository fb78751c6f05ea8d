"""The profilerec HTTP API and its Ray Serve deployments (serve/app.py is the entry point).

Routes: POST /v1/events, GET /v1/users/{user_id}/recommendations, GET /v1/users/{user_id}/profile,
DELETE /v1/users/{user_id}, PUT /v1/items, GET /healthz (OpenAPI spec at /openapi.json, docs at
/docs). The ingress checks every request, groups events by the shard that owns their user, and
waits until each shard has logged them before answering. New or changed items are encoded by the
Encoder deployment (requests batched with @serve.batch), written to a durable log (learned.py),
then picked up by every shard with no restart; so are event texts the encode job never saw.
"""


import asyncio
import dataclasses
import functools
import json
import logging
import os
import time
from collections import Counter
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from profilerec.config import ServeConfig, from_dict, load_config, to_dict
from profilerec.data import storage
from profilerec.data.learned import ITEMS_LOG, TEXTS_LOG
from profilerec.data.schema import (
    EVENT_TYPES,
    ITEMS_SCHEMA,
    MAX_ID_CHARS,
    MAX_TEXT_CHARS,
    check_event_time,
    item_text,
    normalize_id,
    validate_event,
)
from profilerec.data.vectors import items_title_repeats
from profilerec.errors import ShardRetired, StorageUnavailable, ValidationError
from profilerec.model.encoder import TextEncoder, pick_device, runnable_precision, text_hash
from profilerec.model.retrieval import check_retrieval
from profilerec.service.auth import api_token, check_bearer
from profilerec.service.pseudonym import pseudonym
from profilerec.service.reads import ShardReads
from profilerec.service.shard import DEDUP_WINDOW, shard_of
from profilerec.service.shard_actors import load_serving_recommender, open_shards, serving_logs, watch_index
from profilerec.service.telemetry import IngressMetrics
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import BackpressureConfig

log = logging.getLogger("profilerec.serve")

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_TITLE_CHARS = 1000
USER_ID = Path(min_length=1, max_length=MAX_ID_CHARS,
               description="the user's id, as in their events (percent-encoded; it may hold '/')")
RETRY_AFTER_S = 1  # what 503 answers (overload, re-partitioning) tell clients to wait

api = FastAPI(
    title="profilerec",
    version="0.1.0",
    description="Dynamic user profiles from behaviour events, and recommendations from them.",
)


class EventIn(BaseModel):
    """One behaviour event."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="unique id; resending it is a no-op")
    user_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    item_id: Optional[str] = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    ts: Optional[Union[float, str]] = Field(default=None, description="seconds since the epoch or ISO-8601; "
                                                                      "default: arrival time")
    text: Optional[str] = Field(default=None, max_length=MAX_TEXT_CHARS)
    value: Optional[float] = Field(default=None, description="rating value, for type=rating")
    context: Optional[dict[str, Union[str, float, int, bool]]] = None


class EventsIn(BaseModel):
    """A batch of events: checked whole before anything is written (one bad event refuses it), then
    each shard logs its users' part all or nothing. Across shards it is not atomic: after an error,
    retry the same batch, and what was applied counts as duplicates. An event id is recognised as a
    repeat while it is among its user's last 128 accepted events, so a batch holds at most 128
    events per user."""

    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(min_length=1, max_length=1000)


class EventsOut(BaseModel):
    accepted: int
    duplicates: int


class ItemIn(BaseModel):
    """A new item, or the new version of an item (it replaces the old one whole)."""

    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    title: Optional[str] = Field(default=None, max_length=MAX_TITLE_CHARS)
    description: Optional[str] = Field(default=None, max_length=MAX_TEXT_CHARS)
    brand: Optional[str] = Field(default=None, max_length=MAX_TITLE_CHARS)
    categories: list[Annotated[str, Field(min_length=1, max_length=MAX_TITLE_CHARS)]] = Field(default_factory=list,
                                                                                                max_length=50)
    extra: Optional[dict[str, Union[str, float, int, bool]]] = None


class ItemsIn(BaseModel):
    """A batch of items, applied all or nothing."""

    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(min_length=1, max_length=500)


class ItemsOut(BaseModel):
    upserted: int
    new: int


def _client_error(status: int, field: list[Any], message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": [{"loc": field, "msg": message}]})


@functools.lru_cache(maxsize=None)
def _metrics():

    return IngressMetrics()


def _too_large() -> JSONResponse:
    return _client_error(413, ["body"], f"the request body is larger than {MAX_BODY_BYTES} bytes: "
                                        "send fewer events or items per request")


class LimitBodyAndCountRejections:
    """ASGI middleware: 413 for bodies over MAX_BODY_BYTES (announced or streamed) before they are
    parsed, and a count of 4xx answers. Plain ASGI rather than @app.middleware, which costs a
    couple of milliseconds per request."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            _metrics().rejected.inc(tags={"status": "413"})
            return await _too_large()(scope, receive, send)
        if length is None and scope["method"] in ("POST", "PUT"):
            # chunked: read it all here (up to the limit), then hand the app the same body
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > MAX_BODY_BYTES:
                    _metrics().rejected.inc(tags={"status": "413"})
                    return await _too_large()(scope, receive, send)
            receive = _replay(body, receive)

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                _metrics().rejected.inc(tags={"status": str(message["status"])})
            await send(message)

        await self.app(scope, receive, counting_send)


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that first gives `body` whole, then defers to `receive` (disconnects)."""
    given = False

    async def replay() -> dict:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


api.add_middleware(LimitBodyAndCountRejections)


def _unwrap(error: BaseException) -> BaseException:
    # errors raised inside a shard actor reach the ingress wrapped in a RayTaskError
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


@api.exception_handler(Exception)
async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """Never a stack trace to the client: 503 + Retry-After while shards move or cannot write
    their state (the message says why), or while a shard or the Encoder restarts; else a logged 500.
    A write answered 503 may have been applied in part: its retry, with the same event ids, is
    what completes it (see EventsIn)."""
    cause = _unwrap(error)
    if isinstance(cause, (ShardRetired, StorageUnavailable)):
        return _retry_later(str(cause))
    if isinstance(cause, (RayActorError, ActorUnavailableError)):
        log.warning("%s %s: a shard or encoder actor is restarting: %s", request.method, _route(request),
                    type(cause).__name__)
        return _retry_later("a part of the service is restarting; retry the request")
    log.error("%s %s failed: %s", request.method, _route(request), cause, exc_info=cause)
    return JSONResponse(status_code=500, content={"detail": "internal error; it has been logged"})


def _retry_later(detail: str) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": detail}, headers={"Retry-After": str(RETRY_AFTER_S)})


def _route(request: Request) -> str:
    """The path template of the request's route: user ids stay out of the logs."""
    return getattr(request.scope.get("route"), "path", "?")


def _now() -> float:
    return time.time()


def _path_user_id(raw: str) -> str:
    """The user id of a route's path in its one spelling (schema.normalize_id); a 422 naming it
    when it is blank."""
    try:
        return normalize_id(raw, "user_id")
    except ValidationError as e:
        raise HTTPException(422, [{"loc": ["path", "user_id"], "msg": e.problem}]) from None


@serve.deployment(name="Encoder", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256,
                  max_queued_requests=1024, backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S))
class Encoder:
    """The text model that encoded the item index, encoding new item texts in batches."""

    def __init__(self, config: dict[str, Any]):

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        cfg = from_dict(ServeConfig, config)
        # the model and settings recorded by the encode job, so new vectors match the index
        manifest = storage.read_json(storage.join(cfg.embeddings, "manifest.json"))
        precision = runnable_precision(manifest.get("precision", "fp32"), pick_device().type)
        self.encoder = TextEncoder(manifest["model"], max_length=manifest["max_length"], precision=precision)
        log.info("encoder ready: %s on %s (%s)", manifest["model"], self.encoder.device, self.encoder.precision)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def encode(self, texts: list[str]) -> list[list[float]]:
        """Unit vectors of `texts` (each call passes one text; Serve groups concurrent calls)."""
        return self.encoder.encode(texts).tolist()


# a replica at max_ongoing_requests refuses requests, and Serve's proxy backs off before offering
# more: near a replica's capacity that left it idle and served a fraction of the load, where
# requests waiting in the replica (its reads answer in order) keep it busy
@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=512,
                  max_queued_requests=256, backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S))
@serve.ingress(api)
class Ingress:
    """Checks requests, routes them to the shard of their user, and answers."""

    def __init__(self, config: dict[str, Any], encoder: Any):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = from_dict(ServeConfig, config)
        self.encoder = encoder
        app_name = serve.get_replica_context().app_name
        self.shards = open_shards(self.cfg, app_name)
        self.learned = serving_logs(self.cfg)
        # the same recommender as the shards, to score the states they put on their boards: the
        # same items files applied in the same order (learned.py fingerprint). Texts learned while
        # serving are only checked here, never scored, so their vectors stay out of it.
        self.recommender = load_serving_recommender(self.cfg, {ITEMS_LOG: self.learned[ITEMS_LOG]})
        self.title_repeats = items_title_repeats(self.cfg.embeddings)  # new items' text as the catalog's
        # hashes of the event texts encoded while serving (the encode job's are the recommender's
        # text_vectors, memory-mapped: text_vectors.py)
        self.learned_texts: set[str] = set()
        self._catch_up()
        watch_index(self.recommender, self.cfg.retrieval.reload_s)
        self.token = api_token(self.cfg)
        self.reads = ShardReads(self.shards, self.cfg, self.recommender, self.learned[ITEMS_LOG], self._catch_up)
        log.info("ingress ready: %d shards, %d items", len(self.shards), len(self.recommender.index))

    def _catch_up(self) -> None:
        """Learn the items and texts other replicas added."""
        self.recommender.apply_learned({ITEMS_LOG: self.learned[ITEMS_LOG]})
        for texts, _ in self.learned[TEXTS_LOG].unapplied():
            self.learned_texts.update(texts.column("text_hash").to_pylist())

    async def _encode_new_texts(self, events: list) -> None:
        """Encode the event texts no one has encoded yet and log them durably, so every shard
        (now or after a restart) adds the same vector to the profile."""
        new = {text_hash(e.text): e.text for e in events if e.text}
        encoded = self.recommender.text_vectors  # the encode job's only: this replica applies no texts log
        new = {h: t for h, t in new.items() if h not in self.learned_texts and h not in encoded}
        if new:
            self._catch_up()
            new = {h: t for h, t in new.items() if h not in self.learned_texts}
        if not new:
            return
        vectors = await asyncio.gather(*(self.encoder.encode.remote(t) for t in new.values()))
        self.learned[TEXTS_LOG].append(pa.table({"text_hash": list(new)}), np.asarray(vectors, dtype=np.float32))
        self.learned_texts.update(new)

    @api.post("/v1/events", response_model=EventsOut)
    async def post_events(self, body: EventsIn, authorization: Optional[str] = Header(default=None)):
        """Apply a batch of events; every accepted event is durable before the answer."""
        check_bearer(authorization, self.token)
        now = _now()
        if any(e.item_id is not None and e.item_id not in self.recommender.index for e in body.events):
            self._catch_up()  # perhaps added through another replica
        events = []
        for i, raw in enumerate(body.events):
            data = raw.model_dump()
            if data["ts"] is None:
                data["ts"] = now
            try:
                event = validate_event(data, self.recommender.index)
                check_event_time(event.ts, now, self.cfg.max_ahead_s, self.cfg.max_age_s)
            except ValidationError as e:
                return _client_error(422, ["body", "events", i, e.field], e.problem)
            events.append(event)
        most = max(Counter(e.user_id for e in events).values())
        if most > DEDUP_WINDOW:  # a retry of the batch must be recognised whole (shard.py)
            return _client_error(422, ["body", "events"], f"{most} events of one user; a batch may hold at most "
                                                          f"{DEDUP_WINDOW} per user: send the rest in another batch")
        await self._encode_new_texts(events)
        by_shard: dict[int, list] = {}
        for event in events:
            by_shard.setdefault(shard_of(event.user_id, self.cfg.num_shards), []).append(event)
        results = await asyncio.gather(*(self.shards[s].apply.remote(evs) for s, evs in by_shard.items()))
        return EventsOut(accepted=sum(r["accepted"] for r in results),
                         duplicates=sum(r["duplicates"] for r in results))

    @api.put("/v1/items", response_model=ItemsOut)
    async def put_items(self, body: ItemsIn, authorization: Optional[str] = Header(default=None)):
        """Add or replace items: encoded, made durable, then recommended by every shard."""
        check_bearer(authorization, self.token)
        seen: set[str] = set()
        for i, item in enumerate(body.items):
            try:
                item.item_id = normalize_id(item.item_id, "item_id")  # as events name it (validate_event)
            except ValidationError as e:
                return _client_error(422, ["body", "items", i, "item_id"], e.problem)
            if item.item_id in seen:
                return _client_error(422, ["body", "items", i, "item_id"], f"item {item.item_id!r} appears twice")
            seen.add(item.item_id)
            if not (item.title or "").strip() and not (item.description or "").strip():
                return _client_error(422, ["body", "items", i, "title"],
                                     "an item needs a title or a description: its text is what it is recommended by")
        rows = [{**item.model_dump(), "extra": json.dumps(item.extra) if item.extra else None} for item in body.items]
        items = pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA)
        texts = [item_text(r["title"], r["brand"], r["categories"], r["description"], title_repeats=self.title_repeats)
                 for r in rows]
        vectors = np.asarray(await asyncio.gather(*(self.encoder.encode.remote(t) for t in texts)), dtype=np.float32)
        new = sum(1 for r in rows if r["item_id"] not in self.recommender.index)
        self.learned[ITEMS_LOG].append(items, vectors)  # durable before anything else sees the items
        self._catch_up()
        await asyncio.gather(*(shard.sync_learned.remote() for shard in self.shards))
        log.info("upserted %d items (%d new)", len(rows), new)
        return ItemsOut(upserted=len(rows), new=new)

    # "{user_id:path}" on the user routes: events take any id, "/" included (so do the jobs' tables,
    # whose ids come from other systems), and a client's %2F reaches the app decoded, so a plain
    # {user_id} left such users unreadable and undeletable. Refusing "/" at write time instead
    # would strand the users already written. The fixed suffixes keep the three routes apart.
    @api.get("/v1/users/{user_id:path}/recommendations")
    async def recommendations(self, user_id: str = USER_ID, k: int = Query(10, ge=1, le=200), exclude_seen: bool = False,
                              brand: Optional[str] = Query(None, max_length=200),
                              category: Optional[str] = Query(None, max_length=200)):
        """The top-k items for the user (popular items for a user with no events yet)."""
        user_id = _path_user_id(user_id)
        started = time.perf_counter()
        answer = await self.reads.recommend(user_id, k, exclude_seen, brand, category)
        _metrics().recommend_seconds.observe(time.perf_counter() - started)
        return JSONResponse(answer)  # plain JSON types already: skips FastAPI's jsonable_encoder walk

    @api.get("/v1/users/{user_id:path}/profile")
    async def profile(self, user_id: str = USER_ID):
        """What the profile holds: interests, recent events, and why the top items are chosen."""
        user_id = _path_user_id(user_id)
        described = await self.reads.describe(user_id)
        if described is None:
            raise HTTPException(404, f"no profile for user {user_id!r}: it has no events")
        return described

    @api.delete("/v1/users/{user_id:path}")
    async def forget(self, user_id: str = USER_ID, authorization: Optional[str] = Header(default=None)):
        """Forget the user everywhere: memory, log and snapshots."""
        check_bearer(authorization, self.token)
        user_id = _path_user_id(user_id)
        known = await self.shards[shard_of(user_id, self.cfg.num_shards)].forget.remote(user_id)
        log.info("forget request for user %s (known: %s)", pseudonym(user_id), known)
        return {"user_id": user_id, "forgotten": known}

    @api.get("/healthz")
    async def healthz(self):
        """Up when every shard actor answers; with how this replica answered recommendation reads
        (scored from a shard's board, or by the shard)."""
        stats = await asyncio.gather(*(s.stats.remote() for s in self.shards))
        return {"status": "ok", "shards": len(stats), "users": sum(s["users"] for s in stats),
                "replica_reads": dict(self.reads.counts)}


def serving_config(cfg: ServeConfig) -> ServeConfig:
    """`cfg` with its local paths made absolute, as the replicas and actors get it (they run in
    other directories)."""
    check_retrieval(cfg.retrieval)
    paths = ("prepared", "embeddings", "model", "profiles", "state_dir", "token_file")
    retrieval = dataclasses.replace(cfg.retrieval, index=storage.absolute(cfg.retrieval.index))
    return dataclasses.replace(cfg, retrieval=retrieval, **{p: storage.absolute(getattr(cfg, p)) for p in paths})


def build_app(cfg: ServeConfig, **ingress_options: Any):
    """The application bound to `cfg` (see serving_config; `ingress_options`: deployment options of
    the ingress, e.g. max_ongoing_requests)."""
    config = to_dict(serving_config(cfg))
    return Ingress.options(**ingress_options).bind(config, Encoder.bind(config))


def app_from_env():
    """The application with the settings of the YAML file in $PROFILEREC_SERVE_CONFIG (or defaults)."""
    path = os.environ.get("PROFILEREC_SERVE_CONFIG")
    return build_app(load_config(ServeConfig, ["--config", path] if path else []))
