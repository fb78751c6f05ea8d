"""Training throughput: the Ray Train jobs against a plain single-process PyTorch loop.

    flock /tmp/cpu.lock python bench/train_bench.py [--steps 16] [--rounds 2] [--batch_size 32] [--workers 1 2]
                                                    [--bf16 auto|on|off]

Encoder fine-tuning (`jobs/finetune.py`, run_finetune on a TorchTrainer) against a plain PyTorch
loop (same model, same cases in the same batches, the library's own loss, training/finetune.py's
case_loss): Ray is started first and stays up, then for each of `--rounds` rounds the plain loop
runs in a fresh process (at the niceness Ray gives its workers, with the torch threads of a
one-worker job), once with glibc's default malloc and once with the malloc settings the job gives
its Ray Train workers (runtime/cluster.py's MODEL_WORKER_MALLOC), and then the job with one
worker. Each round prints its own ratios, so the spread between rounds shows: to the plain loop as anyone would run it (what
the job gives), and to the plain loop with the job's malloc settings (what Ray Train itself
costs). Then the job with each other worker count, on the same number of samples (n workers step
1/n as often). Only steady-state steps count: the job times its own steps (StepTimer; Ray start,
model load, validation and checkpoints are left out) and writes the rate into the run's history,
which this script reads from the manifest; the plain loop leaves out its first step the same way.
Both sides train on the same device, the job's (a CUDA GPU when torch sees one: the jobs then
train on it through Ray Train, NCCL between workers; the header prints it and each job's line
says where it trained), at the same precision: bf16 autocast where the job turns it on
(FinetuneConfig.bf16: by default on CUDA GPUs and on CPUs with AMX; --bf16 on/off forces it).

The profile scorer (`jobs/train.py`, run_train) is compared with training/scorer.py's train_epoch
in this process (epochs after the first), then run through Ray Train with one worker and with two.

Goal: fine-tuning with one worker at 0.9x the plain loop's samples/s or better. Results:
docs/throughput.md.

Data: encoder fine-tuning on the Amazon Industrial sample bundled with the package; the scorer on
../shared/data/amazon-industrial when present (else the sample) over random unit item vectors
(the rate does not depend on the vectors' values, and no encode job has to run first).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import math
import multiprocessing
import os
import tempfile
import time
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import torch
from machine import describe  # bench/machine.py (the script's folder is on sys.path)


def plain_finetune(cfg, nice: int = 0, threads: Optional[int] = None) -> dict[str, Any]:
    """Samples/s of a single-process loop over the batches the job's first epoch trains on, run
    at niceness `nice` with `threads` torch threads (call it in a fresh process: see plain_in_process)."""
    from profilerec.data.datasets import read_prepared
    from profilerec.model.encoder import TextEncoder, pick_device
    from profilerec.model.profile import ProfileParams
    from profilerec.training.finetune import _item_texts, bf16_enabled, case_loss, epoch_batches, finetune_cases

    if nice > os.nice(0):
        os.nice(nice - os.nice(0))
    if threads:
        torch.set_num_threads(threads)
    params = ProfileParams()
    data = read_prepared(cfg.input)
    train_cases, _ = finetune_cases(data, cfg, params)
    texts = _item_texts(data.items)
    torch.manual_seed(cfg.seed)
    device = pick_device()  # where the job trains: a GPU when there is one
    use_bf16 = bf16_enabled(cfg.bf16, device)  # the job's own choice of autocast
    encoder = TextEncoder(cfg.model, device=str(device), max_length=cfg.max_length)
    encoder.model.train()
    optimizer = torch.optim.AdamW(encoder.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    since, samples, steps = None, 0, 0
    for rows in epoch_batches(len(train_cases), cfg, epoch=0):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = case_loss(encoder, [train_cases[i] for i in rows], texts, params, cfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.model.parameters(), 1.0)
        optimizer.step()
        steps += 1
        if since is None:
            synchronize(device)  # a GPU runs behind the host: time from when the step really ended
            since = time.perf_counter()  # the first step is warm-up, as in the job's StepTimer
        else:
            samples += len(rows)
    synchronize(device)
    seconds = time.perf_counter() - since
    return {"samples_per_s": samples / seconds, "steady_steps": steps - 1, "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "bf16": use_bf16, "nice": os.nice(0),
            "device": device.type}


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_in_process(cfg, nice: int, threads: int, glibc_tunables: str = "") -> dict[str, Any]:
    """plain_finetune in a fresh process, as the job's Ray Train worker is (nothing left over from
    an earlier run: no warm allocator, no loaded model, no idle torch threads of this driver),
    started with GLIBC_TUNABLES=`glibc_tunables` ("": glibc's default malloc)."""
    context = multiprocessing.get_context("spawn")
    saved = os.environ.pop("GLIBC_TUNABLES", None)
    if glibc_tunables:
        os.environ["GLIBC_TUNABLES"] = glibc_tunables  # glibc reads it when the process starts
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            return {**pool.submit(plain_finetune, cfg, nice, threads).result(), "glibc_tunables": glibc_tunables}
    finally:
        os.environ.pop("GLIBC_TUNABLES", None)
        if saved is not None:
            os.environ["GLIBC_TUNABLES"] = saved


def ray_finetune(cfg) -> dict[str, Any]:
    """Samples/s of the finetune job's first epoch, as the job recorded it in its manifest."""
    from profilerec.training.finetune import run_finetune

    manifest = run_finetune(cfg)
    epoch = next(h for h in manifest["history"] if h["epoch"] == 1)
    return {"samples_per_s": epoch["samples_per_s"], "steady_steps": epoch["steady_steps"],
            "torch_threads": epoch["torch_threads"], "interop_threads": epoch["interop_threads"],
            "bf16": epoch["bf16"], "glibc_tunables": epoch["glibc_tunables"], "job_seconds": manifest["seconds"],
            "device": "cuda" if manifest["use_gpu"] else "cpu"}


def ray_worker_conditions() -> dict[str, Any]:
    """The niceness and OMP_NUM_THREADS Ray gives its worker processes (Ray Train's included)."""
    import ray

    @ray.remote(num_cpus=0)
    def conditions() -> dict[str, Any]:
        return {"nice": os.nice(0), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    return ray.get(conditions.remote())


def compare_finetune(base: Any, workers: list[int], rounds: int, tmp: str) -> None:
    """The plain loop (glibc's default malloc, then the job's malloc settings) and the job with
    one worker, alternately for `rounds` rounds (each ratio within a round), then the job with
    each other worker count (against the median plain loop).

    Ray is up for every measurement (its daemons take the same share of the cores from both
    sides), and the plain loop runs in a fresh process at the niceness of Ray's workers with the
    torch threads of a one-worker job. Against the plain loop as anyone would run it, the ratio
    is what the job gives; against the plain loop with the job's malloc settings, it is what Ray
    Train itself costs."""
    from profilerec.runtime.cluster import init_ray, model_worker_malloc
    from profilerec.runtime.parallel import cores_per_worker

    init_ray(base.ray)
    ray_worker = ray_worker_conditions()
    threads = base.threads_per_worker or cores_per_worker(1)
    job_malloc = model_worker_malloc()
    print(f"Ray worker processes: nice {ray_worker['nice']}, OMP_NUM_THREADS={ray_worker['OMP_NUM_THREADS']} "
          f"(the job sets its torch threads itself); plain loop: a fresh process at nice {ray_worker['nice']}, "
          f"{threads} torch threads, Ray up; the job's Ray Train workers run with "
          f"GLIBC_TUNABLES={job_malloc or '(unset)'}", flush=True)

    def job(n: int, tag: str) -> dict[str, Any]:
        # each worker count trains on the same number of samples in all: n workers step 1/n as often
        cfg = dataclasses.replace(base, num_workers=n, max_steps_per_epoch=math.ceil(base.max_steps_per_epoch / n),
                                  output=f"{tmp}/finetune-{tag}", run_name=f"bench-finetune-{tag}",
                                  storage_path=f"{tmp}/ray_train-{tag}")
        return ray_finetune(cfg)

    plains, ratios, alike_ratios = [], [], []
    for r in range(1, rounds + 1):
        plain = plain_in_process(base, ray_worker["nice"], threads)
        plains.append(plain["samples_per_s"])
        print(line(f"round {r}: plain PyTorch loop, 1 process", plain), flush=True)
        alike = plain_in_process(base, ray_worker["nice"], threads, job_malloc) if job_malloc else None
        if alike:
            print(line(f"round {r}: plain loop, the job's malloc settings", alike, plain["samples_per_s"]), flush=True)
        one = job(1, f"1w-round{r}")
        if one["glibc_tunables"] != job_malloc:
            print(f"  the job's worker ran with GLIBC_TUNABLES={one['glibc_tunables'] or '(unset)'}", flush=True)
        ratios.append(one["samples_per_s"] / plain["samples_per_s"])
        text = line(f"round {r}: jobs/finetune, Ray Train, 1 worker", one, plain["samples_per_s"])
        if alike:
            alike_ratios.append(one["samples_per_s"] / alike["samples_per_s"])
            text += f"; {alike_ratios[-1]:.2f}x the plain loop with its malloc settings"
        print(text, flush=True)
    reference = float(np.median(plains))
    if rounds > 1:
        print(f"  jobs/finetune 1 worker / plain loop, per round: {ratios_text(ratios)}; "
              f"plain loop {min(plains):.2f}-{max(plains):.2f} samples/s", flush=True)
        if alike_ratios:
            print(f"  jobs/finetune 1 worker / plain loop with the job's malloc settings, per round: "
                  f"{ratios_text(alike_ratios)}", flush=True)
    for n in (n for n in workers if n != 1):
        print(line(f"jobs/finetune, Ray Train, {n} workers", job(n, f"{n}w"), reference)
              + ("  (ratio to the median plain loop)" if rounds > 1 else ""), flush=True)


def ratios_text(ratios: list[float]) -> str:
    return f"{', '.join(f'{x:.2f}x' for x in ratios)} (median {np.median(ratios):.2f}x)"


def write_random_embeddings(prepared: str, folder: str, dim: int = 384) -> None:
    """Random unit vectors for every item, in the layout the encode job writes."""
    from profilerec.data import storage
    from profilerec.data.datasets import read_prepared
    from profilerec.data.vectors import vectors_to_arrow

    items = read_prepared(prepared).items.column("item_id")
    vectors = np.random.default_rng(0).normal(size=(len(items), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    storage.write_table(pa.table({"item_id": items, "vector": vectors_to_arrow(vectors)}),
                        storage.join(folder, "items", "part-0.parquet"))


def plain_scorer(cfg) -> dict[str, Any]:
    """Cases/s of train_epoch in one process on the job's device (a GPU when there is one), epochs
    after the first."""
    from profilerec.model.encoder import pick_device
    from profilerec.model.scorer import ProfileScorer
    from profilerec.training.scorer import case_tensors, scorer_optimizer, train_epoch, training_loss, training_setup

    device = pick_device()
    setup = training_setup(cfg)
    data = case_tensors(setup.recommender, setup.cases(cfg.train_splits), cfg.scorer)
    priors = setup.priors(cfg.eval_split, cfg.scorer.transition_span)
    torch.manual_seed(cfg.seed)
    model = ProfileScorer(setup.recommender.index.vectors, priors, setup.recommender.params.window,
                          cfg.scorer).to(device)
    optimizer = scorer_optimizer(model, cfg)
    rates = []
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        train_epoch(model, optimizer, data, cfg.batch_size, torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
                    device=device, loss=training_loss(len(setup.recommender.index), cfg), negatives=cfg.negatives)
        synchronize(device)
        rates.append(len(data) / (time.perf_counter() - started))
    return {"samples_per_s": float(np.mean(rates[1:])), "cases": len(data), "threads": torch.get_num_threads(),
            "device": device.type}


def ray_scorer(cfg) -> dict[str, Any]:
    """Cases/s of the train job, epochs after the first, from the history in its manifest."""
    from profilerec.training.scorer import run_train

    manifest = run_train(cfg)
    rates = [h["samples_per_s"] for h in manifest["history"] if h["phase"] == "select"][1:]
    return {"samples_per_s": float(np.mean(rates)), "job_seconds": manifest["seconds"],
            "device": "cuda" if manifest["use_gpu"] else "cpu"}


def line(name: str, result: dict[str, Any], reference: Optional[float] = None) -> str:
    text = f"  {name:<46} {result['samples_per_s']:8.2f} samples/s"
    if reference:
        text += f"   {result['samples_per_s'] / reference:5.2f}x the plain loop"
    extra = {k: v for k, v in result.items() if k not in ("samples_per_s", "glibc_tunables")}  # in the header
    return text + (f"   ({', '.join(f'{k} {v}' for k, v in extra.items())})" if extra else "")


def compare(job: str, base: Any, plain_run: Callable[[Any], dict], ray_run: Callable[[Any], dict],
            workers: list[int], tmp: str, tag: str) -> None:
    """Print the plain loop's samples/s, then the Ray Train job's with each worker count (as a
    ratio to the plain loop), all on the same config `base`."""
    plain = plain_run(base)
    print(line("plain PyTorch loop, 1 process", plain), flush=True)
    for n in workers:
        cfg = dataclasses.replace(base, num_workers=n, output=f"{tmp}/{tag}-{n}", run_name=f"bench-{tag}-{n}w",
                                  storage_path=f"{tmp}/ray_train-{tag}-{n}")
        print(line(f"{job}, Ray Train, {n} worker(s)", ray_run(cfg), plain["samples_per_s"]), flush=True)


def main() -> None:
    import ray
    from profilerec.config import FinetuneConfig, PrepareConfig, RayConfig, TrainConfig, default_data_path
    from profilerec.data.datasets import prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16,
                        help="fine-tuning steps per run, the first one warm-up (n workers: steps/n each)")
    parser.add_argument("--rounds", type=int, default=2, help="plain loop / one-worker job pairs, alternated")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scorer_epochs", type=int, default=4, help="0 skips the scorer")
    parser.add_argument("--skip_finetune", action="store_true")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bf16 autocast in fine-tuning, for the job and the plain loop alike (auto: the job's "
                             "default, on for CUDA GPUs and CPUs with AMX)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    sample = os.path.join(os.path.dirname(__import__("profilerec").__file__), "sample_data", "amazon-industrial-sample")
    print(f"machine: {describe()}")
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'} (the plain loops and the Ray Train jobs alike: "
          f"each line names the device it trained on)")
    with tempfile.TemporaryDirectory() as tmp:
        ray_cfg = RayConfig(num_cpus=4)  # logical CPUs: two 1-CPU workers plus Ray Train's own actors
        if not args.skip_finetune:
            prepare(PrepareConfig(source="amazon", input=sample, output=f"{tmp}/sample"))
            base = FinetuneConfig(input=f"{tmp}/sample", output=f"{tmp}/model", epochs=1, max_steps_per_epoch=args.steps,
                                  batch_size=args.batch_size, max_length=args.max_length, eval_max_cases=20,
                                  bf16={"auto": None, "on": True, "off": False}[args.bf16], ray=ray_cfg)
            print(f"\nencoder fine-tuning (all-MiniLM-L6-v2, batch {args.batch_size} cases, max_length "
                  f"{args.max_length}, {args.steps} steps per run, the first left out, Amazon Industrial sample):")
            compare_finetune(base, args.workers, args.rounds, tmp)
        if args.scorer_epochs:
            data = default_data_path()
            prepare(PrepareConfig(source="amazon", input=data, output=f"{tmp}/scorer-data"))
            write_random_embeddings(f"{tmp}/scorer-data", f"{tmp}/embeddings")
            base = TrainConfig(input=f"{tmp}/scorer-data", embeddings=f"{tmp}/embeddings", output=f"{tmp}/scorer",
                               epochs=args.scorer_epochs, patience=args.scorer_epochs, refit=False, ray=ray_cfg)
            print(f"\nprofile scorer ({os.path.basename(data)}, batch {base.batch_size} cases, "
                  f"{args.scorer_epochs} epochs, the first left out):")
            compare("jobs/train", base, plain_scorer, ray_scorer, args.workers, tmp, "scorer")
        ray.shutdown()


if __name__ == "__main__":
    main()
