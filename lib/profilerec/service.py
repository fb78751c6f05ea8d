"""The profilerec HTTP API and its Ray Serve deployments (serve/app.py is the entry point).

Routes: POST /v1/events, GET /v1/users/{user_id}/recommendations, GET /v1/users/{user_id}/profile,
DELETE /v1/users/{user_id}, GET /healthz. The ingress checks every request, groups events by the
shard that owns their user, and waits until each shard has logged them before answering.
"""


import asyncio
import dataclasses
import logging
import os
import secrets
from typing import Any, Literal, Optional, Union

import ray
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from profilerec import storage
from profilerec.config import ServeConfig, from_dict, load_config, to_dict
from profilerec.errors import ValidationError
from profilerec.schema import EVENT_TYPES, MAX_ID_CHARS, MAX_TEXT_CHARS, validate_event
from profilerec.shard_actors import get_or_create_shards
from profilerec.shard import pseudonym, shard_of

log = logging.getLogger("profilerec.serve")

MAX_BODY_BYTES = 4 * 1024 * 1024

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
    """A batch of events, applied all or nothing."""

    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(min_length=1, max_length=1000)


class EventsOut(BaseModel):
    accepted: int
    duplicates: int


def _client_error(status: int, field: list[Any], message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": [{"loc": field, "msg": message}]})


def _now() -> float:
    import time

    return time.time()


def api_token(cfg: ServeConfig) -> str:
    """The write token: $PROFILEREC_API_TOKEN, else the token file (created once, mode 0600)."""
    token = os.environ.get(cfg.token_env)
    if token:
        return token.strip()
    location = cfg.token_file or storage.join(cfg.state_dir, "api_token")
    if not storage.exists(location):
        storage.write_bytes(secrets.token_urlsafe(32).encode(), location)
        if not storage.is_uri(location):
            os.chmod(location, 0o600)
        log.warning("no API token configured: generated one in %s", location)
    return storage.read_bytes(location).decode().strip()


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64,
                  max_queued_requests=256)
@serve.ingress(api)
class Ingress:
    """Checks requests, routes them to the shard of their user, and answers."""

    def __init__(self, config: Optional[dict[str, Any]] = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = from_dict(ServeConfig, config or {})
        app_name = serve.get_replica_context().app_name
        self.shards = get_or_create_shards(self.cfg, app_name)
        items = storage.read_table(storage.join(self.cfg.prepared, "items.parquet"), columns=["item_id"])
        self.known_items = set(items.column("item_id").to_pylist())
        self.token = api_token(self.cfg)
        log.info("ingress ready: %d shards, %d items", len(self.shards), len(self.known_items))

    def _require_token(self, authorization: Optional[str]) -> None:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "this endpoint needs an 'Authorization: Bearer <token>' header",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(authorization[len("Bearer "):].strip(), self.token):
            raise HTTPException(403, "the bearer token is not valid")

    @api.post("/v1/events", response_model=EventsOut)
    async def post_events(self, body: EventsIn, authorization: Optional[str] = Header(default=None)):
        """Apply a batch of events; every accepted event is durable before the answer."""
        self._require_token(authorization)
        now = _now()
        events = []
        for i, raw in enumerate(body.events):
            data = raw.model_dump()
            if data["ts"] is None:
                data["ts"] = now
            try:
                events.append(validate_event(data, self.known_items))
            except ValidationError as e:
                return _client_error(422, ["body", "events", i, e.field], e.problem)
        by_shard: dict[int, list] = {}
        for event in events:
            by_shard.setdefault(shard_of(event.user_id, self.cfg.num_shards), []).append(event)
        results = await asyncio.gather(*(self.shards[s].apply.remote(evs) for s, evs in by_shard.items()))
        return EventsOut(accepted=sum(r["accepted"] for r in results),
                         duplicates=sum(r["duplicates"] for r in results))

    @api.get("/v1/users/{user_id}/recommendations")
    async def recommendations(self, user_id: str, k: int = Query(10, ge=1, le=200), exclude_seen: bool = False,
                              brand: Optional[str] = Query(None, max_length=200),
                              category: Optional[str] = Query(None, max_length=200)):
        """The top-k items for the user (popular items for a user with no events yet)."""
        shard = self.shards[shard_of(user_id, self.cfg.num_shards)]
        return await shard.recommend.remote(user_id, k, exclude_seen, brand, category)

    @api.get("/v1/users/{user_id}/profile")
    async def profile(self, user_id: str):
        """What the profile holds: interests, recent events, and why the top items are chosen."""
        described = await self.shards[shard_of(user_id, self.cfg.num_shards)].describe.remote(user_id)
        if described is None:
            raise HTTPException(404, f"no profile for user {user_id!r}: it has no events")
        return described

    @api.delete("/v1/users/{user_id}")
    async def forget(self, user_id: str, authorization: Optional[str] = Header(default=None)):
        """Forget the user everywhere: memory, log and snapshots."""
        self._require_token(authorization)
        known = await self.shards[shard_of(user_id, self.cfg.num_shards)].forget.remote(user_id)
        log.info("forget request for user %s (known: %s)", pseudonym(user_id), known)
        return {"user_id": user_id, "forgotten": known}

    @api.get("/healthz")
    async def healthz(self):
        """Up when every shard actor answers."""
        stats = await asyncio.gather(*(s.stats.remote() for s in self.shards))
        return {"status": "ok", "shards": len(stats), "users": sum(s["users"] for s in stats)}


def build_app(cfg: ServeConfig):
    """The application bound to `cfg`, its local paths made absolute for the replicas and actors."""
    paths = ("prepared", "embeddings", "model", "profiles", "state_dir", "token_file")
    cfg = dataclasses.replace(cfg, **{p: storage.absolute(getattr(cfg, p)) for p in paths})
    return Ingress.bind(to_dict(cfg))


def app_from_env():
    """The application with the settings of the YAML file in $PROFILEREC_SERVE_CONFIG (or defaults)."""
    path = os.environ.get("PROFILEREC_SERVE_CONFIG")
    return build_app(load_config(ServeConfig, ["--config", path] if path else []))
