"""Training over a subset of the catalog: the scorer's forward over given item rows, the sampled
softmax with its logQ correction and the negative sampler, against the full softmax (no Ray)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from profilerec.cli.commands import check_train
from profilerec.config import ScorerConfig, TrainConfig
from profilerec.data.schema import Event
from profilerec.errors import ConfigError
from profilerec.model.index import ItemIndex
from profilerec.model.priors import item_priors
from profilerec.model.profile import ProfileParams, ProfileState, apply_event
from profilerec.model.ranking import target_ranks
from profilerec.model.scorer import ProfileScorer
from profilerec.model.scorer_inputs import scorer_batch
from profilerec.training.losses import full_softmax_loss, sampled_softmax_loss
from profilerec.training.scorer import CaseTensors, NegativeSampler, model_metrics, train_epoch, training_loss

DIM = 16


def _catalog(n: int, clusters: int, seed: int = 0) -> ItemIndex:
    rng = np.random.default_rng(seed)
    # items in clusters, as text embeddings are
    centres = rng.normal(size=(clusters, DIM))
    vectors = centres[rng.integers(0, clusters, n)] + 0.4 * rng.normal(size=(n, DIM))
    return ItemIndex([f"i{i}" for i in range(n)], vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


def _events(user: str, rows) -> list[Event]:
    return [Event(event_id=f"{user}:{n}", user_id=user, item_id=f"i{r}", type="view", ts=3600.0 * n)
            for n, r in enumerate(rows)]


def _state(index: ItemIndex, events: list[Event], params: ProfileParams) -> ProfileState:
    state = ProfileState("u")
    for event in events:
        state = apply_event(state, event, index.vector(event.item_id), params)
    return state


CONFIGS = [ScorerConfig(id_embeddings=True), ScorerConfig(attention=False, popularity=False),
           ScorerConfig(interests=False, repeat=False, transitions=False)]
CONFIG_IDS = ["every part", "no attention or popularity", "content and attention only"]


@pytest.mark.parametrize("with_targets", [False, True], ids=["no targets", "targets"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_forward_over_rows_is_the_full_forwards_columns(cfg, with_targets):
    index = _catalog(40, 4)
    params = ProfileParams()
    rng = np.random.default_rng(2)
    sequences = {f"u{u}": _events(f"u{u}", rng.integers(0, 40, 12)) for u in range(30)}
    model = ProfileScorer(index.vectors, item_priors(sequences, index, span=2), params.window, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():  # every term away from its neutral start, ID embeddings too
            weight.normal_(std=0.5)
    model.eval()
    histories = [sequences["u0"][:5], sequences["u1"][:11], sequences["u2"][:1], sequences["u3"][:8]]
    batch = scorer_batch([_state(index, h, params) for h in histories], index.row, params, cfg, index.dim)
    # the targets follow their histories in the log: their own counts are in the priors
    targets = torch.tensor([index.row(sequences[u][n].item_id) for u, n in (("u0", 5), ("u1", 11), ("u2", 1),
                                                                           ("u3", 8))]) if with_targets else None
    window = set(batch.items[batch.mask].tolist())
    rows = torch.as_tensor(rng.permutation(40)[:15])  # unsorted, some window items and targets, some not
    with torch.no_grad():
        full = model(batch, targets)
        for subset in (rows, torch.arange(40).flip(0), torch.tensor(sorted(window)[:3]), rows[:0]):
            np.testing.assert_allclose(model(batch, targets, rows=subset).numpy(), full[:, subset].numpy(),
                                       rtol=1e-5, atol=1e-5)
    if with_targets:
        assert any(int(t) in set(rows.tolist()) for t in targets)  # the leave-one-out was on a column


def test_the_sampled_loss_over_every_item_without_correction_is_the_full_softmax():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 30), torch.tensor([3, 3, 0, 29, 7, 12])
    full = full_softmax_loss(logits, targets)
    every = torch.arange(30)
    assert float(sampled_softmax_loss(logits, targets, every, targets)) == pytest.approx(float(full), rel=1e-6)
    # no item is drawn as a negative more or less than once in expectation: a correction of log 1
    zero = torch.zeros(30)
    assert float(sampled_softmax_loss(logits, targets, every, targets, zero)) == pytest.approx(float(full), rel=1e-6)


def test_accidental_hits_are_removed_and_the_negatives_corrected():
    torch.manual_seed(0)
    targets = torch.tensor([4, 9, 4])
    # candidates: the batch's targets (columns 0-2), then draws: 9 is case 1's target, 5 drawn twice
    candidates = torch.tensor([4, 9, 4, 9, 5, 5, 2])
    labels = torch.arange(3)
    logits = torch.randn(3, len(candidates), requires_grad=True)
    log_expected = torch.log(torch.tensor([0.5, 0.4, 0.5, 0.4, 1.5, 1.5, 0.2]))
    loss = sampled_softmax_loss(logits, labels, candidates, targets, log_expected)
    expected = []
    for case, negatives in ((0, [1, 3, 4, 5, 6]), (1, [0, 2, 4, 5, 6]), (2, [1, 3, 4, 5, 6])):
        # the target keeps its logit; each negative draw is corrected; the case's own target elsewhere is gone
        row = torch.cat([logits[case, case:case + 1], logits[case, negatives] - log_expected[negatives]])
        expected.append(-F.log_softmax(row, 0)[0])
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    loss.backward()
    assert logits.grad[0, 2] == 0 and logits.grad[2, 0] == 0 and logits.grad[1, 3] == 0  # hits: no gradient
    assert (logits.grad[:, 4:] != 0).all()


def test_the_correction_is_finite_and_trains_every_part():
    index = _catalog(300, 10)
    params = ProfileParams()
    rng = np.random.default_rng(0)
    sequences = {f"u{u}": _events(f"u{u}", rng.integers(0, 300, 10)) for u in range(40)}
    cfg = ScorerConfig(id_embeddings=True)
    model = ProfileScorer(index.vectors, item_priors(sequences, index), params.window, cfg)
    with torch.no_grad():
        model.trans.fill_(0.5)  # a non-zero start: the transition features reach the loss
    states = [_state(index, sequences[f"u{u}"][:9], params) for u in range(40)]
    batch = scorer_batch(states, index.row, params, cfg, index.dim)
    targets = torch.tensor([index.row(sequences[f"u{u}"][9].item_id) for u in range(40)])
    sampler = NegativeSampler(model.popularity, targets, len(index))
    candidates, labels, log_expected = sampler.candidates(targets, 64, torch.Generator().manual_seed(0))
    assert torch.isfinite(log_expected).all()
    rows, columns = torch.unique(candidates, return_inverse=True)
    loss = sampled_softmax_loss(model(batch, targets, rows=rows)[:, columns], labels, candidates, targets, log_expected)
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("proj.weight", "item_ids.weight", "scale", "pop", "repeat", "trans", "query.weight", "mix"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_the_sampler_draws_from_q_and_its_expected_counts_make_the_partition_unbiased():
    n_items, cases, batch_size, negatives = 30, 40, 8, 6
    rng = np.random.default_rng(0)
    popularity = torch.as_tensor(rng.zipf(1.5, n_items).astype(np.float32))
    popularity[:5] = 0  # never touched: only the uniform part draws them
    targets = torch.as_tensor(rng.integers(0, n_items, cases))
    sampler = NegativeSampler(popularity, targets, n_items)
    generator = torch.Generator().manual_seed(0)
    draws = sampler.draw(200_000, generator)
    frequency = torch.bincount(draws, minlength=n_items).double() / len(draws)
    np.testing.assert_allclose(frequency.numpy(), sampler.proposal(torch.arange(n_items)).numpy(), atol=4e-3)
    again = [sampler.draw(50, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*again)  # a generator's seed decides the draws
    # epochs as train_epoch shuffles them: each case's estimate of the rest of its partition,
    # sum over its negative draws of exp(s_c) / m_c, averages to the exact sum
    scores = torch.as_tensor(rng.normal(size=n_items))
    estimates, exact = torch.zeros(cases, dtype=torch.float64), torch.zeros(cases, dtype=torch.float64)
    for _ in range(1500):
        order = torch.randperm(cases, generator=generator)
        for start in range(0, cases, batch_size):
            mine = order[start:start + batch_size]
            candidates, labels, log_expected = sampler.candidates(targets[mine], negatives, generator)
            terms = torch.exp(scores[candidates] - log_expected.double())[None, :].expand(len(mine), -1).clone()
            terms[(candidates[None, :] == targets[mine][:, None])] = 0  # the own column and accidental hits
            estimates[mine] += terms.sum(1)
            exact[mine] += torch.exp(scores).sum() - torch.exp(scores[targets[mine]])
    np.testing.assert_allclose(estimates.sum().item(), exact.sum().item(), rtol=0.01)


def _next_item_problem(n_items: int, seed: int = 0):
    """Users whose next item is a near neighbour of their last one, or its fixed partner (a jump the
    text does not show, only the log's transitions): train cases on every step, a validation case
    on each user's last event, whose target the priors do not count."""
    index = _catalog(n_items, 25, seed)
    rng = np.random.default_rng(seed)
    near = np.argsort(-(index.vectors @ index.vectors.T), axis=1)[:, 1:6]
    partner = rng.permutation(n_items)
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.8
    sequences = {}
    for u in range(260):
        rows = [int(rng.choice(n_items, p=weights / weights.sum()))]
        for _ in range(9):
            rows.append(int(partner[rows[-1]]) if rng.random() < 0.3 else int(near[rows[-1], rng.integers(0, 5)]))
        sequences[f"u{u}"] = _events(f"u{u}", rows)
    params = ProfileParams()
    priors = item_priors(sequences, index, hidden={events[-1].event_id for events in sequences.values()})
    cfg = ScorerConfig()

    def cases(positions):
        states, targets = [], []
        for events in sequences.values():
            state = ProfileState("u")
            for n, event in enumerate(events):
                if n in positions:
                    states.append(state)
                    targets.append(index.row(event.item_id))
                state = apply_event(state, event, index.vector(event.item_id), params)
        batch = scorer_batch(states, index.row, params, cfg, index.dim)
        return CaseTensors(batch, torch.as_tensor(targets, dtype=torch.int64))

    return index, priors, params, cfg, cases(set(range(1, 9))), cases({9})


@pytest.fixture
def one_thread():
    """Steps this small run fastest on one thread (and do not fight other work for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trained_ndcg(loss: str, epochs: int = 8) -> tuple[float, float]:
    index, priors, params, cfg, train, valid = _next_item_problem(600)
    torch.manual_seed(0)
    model = ProfileScorer(index.vectors, priors, params.window, cfg)
    before = model_metrics(model, valid)["NDCG@10"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        train_epoch(model, optimizer, train, 64, torch.Generator().manual_seed(epoch), loss=loss, negatives=48)
    return before, model_metrics(model, valid)["NDCG@10"]


def test_sampled_training_ranks_about_as_well_as_the_full_softmax(one_thread):
    before, full = _trained_ndcg("full")
    _, sampled = _trained_ndcg("sampled")
    # both learn (the partner jumps are only in the transitions), and 48 negatives per step over
    # 600 items come close to the softmax over all of them
    assert full > before + 0.07
    assert sampled > before + 0.07
    assert sampled > full - 0.03


def _scorer_and_cases(n_items: int, users: int, seed: int) -> tuple[ProfileScorer, CaseTensors]:
    """An untrained scorer over a catalog of `n_items` and one case per user (the 12th event after
    the first 11), every event among the first 500 items."""
    index = _catalog(n_items, 50)
    params = ProfileParams()
    rng = np.random.default_rng(seed)
    sequences = {f"u{u}": _events(f"u{u}", rng.integers(0, 500, 12)) for u in range(users)}
    cfg = ScorerConfig()
    model = ProfileScorer(index.vectors, item_priors(sequences, index), params.window, cfg)
    batch = scorer_batch([_state(index, events[:11], params) for events in sequences.values()], index.row, params, cfg,
                         index.dim)
    return model, CaseTensors(batch, torch.tensor([index.row(events[11].item_id) for events in sequences.values()]))


def _projected_rows(n_items: int, loss: str) -> int:
    """Item rows a training step projects, over a catalog of `n_items` whose first 500 items are
    the ones the batch touches."""
    model, data = _scorer_and_cases(n_items, users=64, seed=0)
    counted = []
    model.proj.register_forward_hook(lambda module, inputs, output: counted.append(inputs[0].shape[:-1].numel()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_epoch(model, optimizer, data, len(data), torch.Generator().manual_seed(0), loss=loss, negatives=256)
    return sum(counted)


def test_a_sampled_steps_cost_does_not_grow_with_the_catalog():
    batch, window, negatives = 64, ProfileParams().window, 256
    # the window items, the targets and the draws, and the interest vectors (two per case)
    bound = batch * window + batch + negatives + 2 * batch
    small, large = _projected_rows(2_000, "sampled"), _projected_rows(50_000, "sampled")
    assert small <= bound and large <= bound
    assert _projected_rows(50_000, "full") >= 50_000


def test_the_loss_follows_the_setting_and_the_catalogs_size():
    assert training_loss(199_999, TrainConfig()) == "full"
    assert training_loss(200_000, TrainConfig()) == "sampled"
    assert training_loss(10, TrainConfig(loss="sampled")) == "sampled"
    assert training_loss(10**7, TrainConfig(loss="full")) == "full"
    assert training_loss(100, TrainConfig(sampled_from=100)) == "sampled"
    with pytest.raises(ConfigError, match="setting loss: 'sampeld'"):
        training_loss(10, TrainConfig(loss="sampeld"))
    with pytest.raises(ConfigError, match="setting train.loss: 'sampeld' is not a loss; choose one of auto, full"):
        check_train(TrainConfig(loss="sampeld"), "train.", inputs=False)
    with pytest.raises(ConfigError, match="setting negatives"):
        check_train(TrainConfig(negatives=0), inputs=False)


def test_evaluation_ranks_the_catalog_a_part_at_a_time_with_the_ranks_of_whole_scoring(monkeypatch):
    import profilerec.training.scorer as training

    model, data = _scorer_and_cases(5_000, users=40, seed=1)
    model.eval()
    with torch.no_grad():
        batch, targets = data.take(torch.arange(len(data)))
        whole = target_ranks(model(batch).numpy(), targets.numpy())
    assert len(set(whole.tolist())) > 10  # the cases rank their targets all over the list
    sizes, projected = [], []
    model.register_forward_hook(lambda module, inputs, output: sizes.append(output.shape))
    model.proj.register_forward_hook(lambda module, inputs, output: projected.append(inputs[0].shape[0]))
    monkeypatch.setattr(training, "EVAL_ITEMS", 700)  # 8 parts, the last one shorter
    monkeypatch.setattr(training, "EVAL_SCORES", 3 * 700)  # three cases per batch
    np.testing.assert_array_equal(training.model_ranks(model, data), whole)
    assert max(cases for cases, _ in sizes) == 3 and sum(cases for cases, _ in sizes) == 8 * len(data)
    assert max(columns for _, columns in sizes) <= 700 + 3  # a part, and the targets from other parts
    assert projected.count(700) == 7 and 5_000 not in projected  # each part projected once for every batch
