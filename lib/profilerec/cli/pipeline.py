"""The main job: prepare -> encode -> [fine-tune the encoder -> encode again] -> train the profile
scorer -> index -> profiles -> evaluate -> serve.

Every stage is the same library call its own job makes; this module only chains them over one
work folder and, at the end, starts the service and shows a user's recommendations moving as
events arrive.

    <work_dir>/prepared           canonical Parquet (events, items, cases)
    <work_dir>/embeddings/base    item/text vectors of the untuned encoder
    <work_dir>/model              the trained profile scorer (model/scorer) and, with
                                  run_finetune, the fine-tuned encoder (model/encoder)
    <work_dir>/embeddings/model   item/text vectors of the fine-tuned encoder (run_finetune only)
    <work_dir>/index              the nearest-neighbour index of two-stage retrieval
    <work_dir>/profiles           batch-built profile states + item priors
    <work_dir>/report             evaluation report (JSON, Markdown, PNG)
    <work_dir>/serve_state        the service's write-ahead logs and snapshots
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from typing import Any, Optional

from profilerec.batch.encode import run_encode
from profilerec.batch.evaluate import report_markdown, run_evaluate
from profilerec.batch.index import run_index
from profilerec.batch.profiles import run_profiles
from profilerec.cli import summaries
from profilerec.cli.console import current, progress, say, stage, summary
from profilerec.config import PipelineConfig, ProfilesConfig
from profilerec.data import storage
from profilerec.data.datasets import prepare, read_prepared
from profilerec.runtime.cluster import cluster_gpus, init_ray
from profilerec.service.api import build_app
from profilerec.service.auth import api_token
from profilerec.training.finetune import run_finetune
from profilerec.training.scorer import run_train
from ray import serve


def stage_configs(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with every section's input/output locations placed under `cfg.work_dir`."""
    work = storage.absolute(cfg.work_dir)
    prepared, base, model = (storage.join(work, p) for p in ("prepared", "embeddings/base", "model"))
    model_emb, profiles = storage.join(work, "embeddings/model"), storage.join(work, "profiles")
    index = storage.join(work, "index")
    embeddings = model_emb if cfg.run_finetune else base
    replace = dataclasses.replace
    return replace(
        cfg,
        prepare=replace(cfg.prepare, output=prepared),
        encode=replace(cfg.encode, input=prepared, output=base, ray=cfg.ray),
        finetune=replace(cfg.finetune, input=prepared, output=model, ray=cfg.ray),
        train=replace(cfg.train, input=prepared, embeddings=embeddings, output=model, ray=cfg.ray),
        index=replace(cfg.index, input=prepared, embeddings=embeddings, model=model, output=index),
        evaluate=replace(cfg.evaluate, input=prepared, embeddings=embeddings, model=model,
                         baseline_embeddings=base if cfg.run_finetune else None,
                         output=storage.join(work, "report"), retrieval=replace(cfg.evaluate.retrieval, index=index)),
        serve=replace(cfg.serve, prepared=prepared, embeddings=embeddings, model=model, profiles=profiles,
                      state_dir=storage.join(work, "serve_state"), retrieval=replace(cfg.serve.retrieval, index=index)),
    )


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage; returns the evaluation report, the demo output and each stage's seconds."""

    cfg = stage_configs(cfg)
    with stage("start Ray"):
        init_ray(cfg.ray)
        use_gpu = cluster_gpus() > 0
    with stage("prepare"):
        data = prepare(cfg.prepare)
        say(f"  {data.events.num_rows:,} events, {data.items.num_rows:,} items, {data.cases.num_rows:,} cases "
            f"from {cfg.prepare.input}")
    with stage("encode (base model)"):
        say("  " + summaries.encoded(run_encode(cfg.encode, use_gpu, progress=progress), cfg.encode.output))
    if cfg.run_finetune:
        with stage("fine-tune"):
            say("  " + summaries.finetuned(run_finetune(cfg.finetune, progress=progress), cfg.finetune.output))
        with stage("encode (fine-tuned model)"):
            encoder_dir = storage.join(cfg.finetune.output, "encoder")
            tuned = run_encode(dataclasses.replace(cfg.encode, model=encoder_dir, output=cfg.evaluate.embeddings),
                               use_gpu, progress=progress)
            say("  " + summaries.encoded(tuned, cfg.evaluate.embeddings))
    with stage("train profile scorer"):
        trained = run_train(cfg.train, progress=progress)
        say(f"  {summaries.trained(trained, cfg.train)}")
    with stage("index"):
        say("  " + summaries.indexed(run_index(cfg.index), cfg.index.output))
    with stage("profiles"):
        built = run_profiles(ProfilesConfig(input=cfg.prepare.output, embeddings=cfg.evaluate.embeddings,
                                            model=cfg.finetune.output, output=cfg.serve.profiles))
        say(f"  {built['users']:,} users")
    with stage("evaluate"):
        report = run_evaluate(cfg.evaluate, progress=progress)
    say("\n" + report_markdown(report))
    demo: Optional[dict[str, Any]] = None
    if cfg.run_service:
        with stage("serve + demo requests"):
            demo = serve_and_demo(cfg)
    timings = dict(current().timings)
    if cfg.run_service and cfg.keep_serving:
        summary()
        _wait_until_interrupted(cfg)
    return {"report": report, "demo": demo, "timings": timings}


def _wait_until_interrupted(cfg: PipelineConfig) -> None:
    """Keep the service up (this process holds the local Ray instance) until Ctrl-C."""
    say(f"\nServing on http://{cfg.serve.host}:{cfg.serve.port} until Ctrl-C "
        f"(OpenAPI spec at /docs and /openapi.json)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping")


def serve_and_demo(cfg: PipelineConfig) -> dict[str, Any]:
    """Start the service on this Ray instance, then show one user's recommendations moving."""

    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg.serve), name="profilerec", route_prefix="/")
    base = f"http://{cfg.serve.host}:{cfg.serve.port}"
    token = api_token(cfg.serve)
    data = read_prepared(cfg.prepare.output)
    # A real user's first few items, replayed as a brand-new user so the change is visible.
    items = data.events.column("item_id").to_pylist()
    users = data.events.column("user_id").to_pylist()
    first_user = users[0]
    story = [i for u, i in zip(users, items) if u == first_user and i is not None][:4]
    user = "demo-user"
    _http("DELETE", f"{base}/v1/users/{user}", token=token)
    before = _http("GET", f"{base}/v1/users/{user}/recommendations?k=5")
    events = [{"event_id": f"demo-{n}", "user_id": user, "item_id": item, "type": "purchase",
               "ts": 1_700_000_000 + 3600 * n} for n, item in enumerate(story)]
    posted = _http("POST", f"{base}/v1/events", {"events": events}, token=token)
    after = _http("GET", f"{base}/v1/users/{user}/recommendations?k=5")
    profile = _http("GET", f"{base}/v1/users/{user}/profile")
    titles = {i: t for i, t in zip(data.items.column("item_id").to_pylist(), data.items.column("title").to_pylist())}
    say(f"  service at {base} (API token in {cfg.serve.state_dir}/api_token)")
    say(f"\nRecommendations for a new user ({user}), before any event (popular items):")
    _print_items(before["items"])
    say(f"\nEvents posted ({posted['accepted']} accepted):")
    for e in events:
        say(f"  purchase  {e['item_id']:>8}  {(titles.get(e['item_id']) or '')[:70]}")
    say("\nRecommendations after those events:")
    _print_items(after["items"])
    return {"before": before, "posted": posted, "after": after, "profile": profile}


def _print_items(items: list[dict[str, Any]]) -> None:
    """One line per recommended item: rank, id, score, the start of its title."""
    for rank, item in enumerate(items, 1):
        say(f"  {rank}. {item['item_id']:>8}  {item['score']:.3f}  {(item.get('title') or '')[:70]}")


def _http(method: str, url: str, body: Optional[dict] = None, token: Optional[str] = None,
          timeout: float = 60.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")
