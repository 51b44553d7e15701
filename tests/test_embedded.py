import numpy as np
import pytest
import torch
from torch import nn

from cmdcli.embedded import EmbeddedCMD, embedding_movement, least_moved
from cmdcli.errors import InputError
from tests.builders import TinyNet
from tests.tolerances import affine_tol, assert_within

# --------------------------------------------------------------------------- the rule


def test_least_moved_takes_the_smallest_ties_by_index_and_respects_the_fraction():
    moved = np.array([0.5, 0.1, 0.1, 0.0, 0.9, 0.2, np.inf])
    candidates = np.array([True, True, True, False, True, True, True])
    # 6 candidates, half of them: 3; index 3 (0.0) is no candidate; 1 and 2 tie
    np.testing.assert_array_equal(least_moved(moved, candidates, 0.5), [1, 2, 5])
    np.testing.assert_array_equal(least_moved(moved, candidates, 0.34), [1, 2])
    np.testing.assert_array_equal(least_moved(moved, candidates, 1.0), [1, 2, 5, 0, 4, 6])
    assert len(least_moved(moved, candidates, 0.1)) == 0  # floor(0.6): never above the share
    assert len(least_moved(np.zeros(100), np.ones(100, bool), 0.29)) == 29


def test_movement_is_the_rms_change_of_the_fitted_trajectory_over_the_weight_std():
    rng = np.random.default_rng(0)
    T, N = 9, 30
    refs = rng.normal(size=(2, T)).cumsum(axis=1)
    modes = rng.integers(0, 2, N)
    W = rng.normal(size=(N, T)).cumsum(axis=1)
    a0, b0, a1, b1 = rng.normal(size=(4, N))
    got = embedding_movement(
        a0, b0, a1, b1, modes, refs.mean(axis=1), refs.var(axis=1), W.var(axis=1)
    )
    change = (a1 - a0)[:, None] * refs[modes] + (b1 - b0)[:, None]
    expected = np.sqrt((change**2).mean(axis=1)) / W.std(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-12)

    # invariant to scaling/shifting a weight (w → c·w + d) and a reference (r → s·r + u)
    c, d, s, u = 3.0, -2.0, 0.25, 5.0
    refs2 = s * refs + u
    a0s, a1s = c * a0 / s, c * a1 / s
    b0s, b1s = c * b0 + d - a0s * u, c * b1 + d - a1s * u
    again = embedding_movement(
        a0s, b0s, a1s, b1s, modes, refs2.mean(axis=1), refs2.var(axis=1), (c * W + d).var(axis=1)
    )
    np.testing.assert_allclose(again, expected, rtol=1e-9)

    # a constant weight: 0 if its fit stayed, infinite if it moved
    still = embedding_movement(
        np.ones(2), np.zeros(2), np.array([1.0, 1.5]), np.zeros(2), np.zeros(2, int),
        np.ones(1), np.ones(1), np.zeros(2),
    )  # fmt: skip
    np.testing.assert_array_equal(still, [0.0, np.inf])


def set_flat(model, values):
    with torch.no_grad():
        start = 0
        for p in model.parameters():
            p.copy_(torch.from_numpy(values[start : start + p.numel()]).reshape(p.shape))
            start += p.numel()


def test_embedding_rule_on_a_hand_made_run():
    # Linear(4→3): 15 weights. 8 are exact affine copies of r(t) = t with large
    # |a| ("stable"), 7 are 0.5·t + b + c·t² with c = 0.1 … 0.7 ("drifting"):
    # their (a, b) keep changing, the more so the larger c. One mode; every
    # weight is sampled.
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    rng = np.random.default_rng(1)
    drifting = rng.permutation(15)[:7]
    a = rng.uniform(1.5, 2.5, 15) * rng.choice([-1, 1], 15)
    a[drifting] = 0.5
    b = rng.normal(size=15)
    c = np.zeros(15)
    c[drifting] = 0.1 * np.arange(1, 8)

    def epoch_values(e):
        t = e / 10
        return (a * t + b + c * t * t).astype(np.float32)

    emb = EmbeddedCMD(model, n_modes=1, warmup=4, every=2, fraction=9 / 14, n_samples=100)
    for e in range(1, 6):
        set_flat(model, epoch_values(e))
        emb.after_step()
        emb.after_epoch()
        assert emb.n_embedded_ == 0  # warm-up (epochs 1–4), then the first interval
    assert emb.online.is_warm_
    ref = int(emb.online.reference_index_[0])
    assert c[ref] == 0  # precondition: the reference is a stable weight

    set_flat(model, epoch_values(6))
    emb.after_step()
    emb.after_epoch()  # 2 epochs after warm-up: first embedding
    # 14 candidates (all but the reference); floor(9/14 · 14) = 9: the 7 other
    # stable weights and the two slowest drifters.
    expected = {i for i in range(15) if c[i] == 0 and i != ref}
    expected |= set(drifting[:2].tolist())
    assert set(np.flatnonzero(emb.embedded_mask_).tolist()) == expected
    assert emb.n_embedded_ == 9 and emb.embedded_fraction_ == 9 / 15
    # set at once to a·r + b with the live reference
    live = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    idx = np.flatnonzero(emb.embedded_mask_)
    fa, fb = emb.online.a_[idx], emb.online.b_[idx]
    # both a·r + b in float32, maybe rounded in another order (or fused)
    assert_within(live[idx], fa * live[ref] + fb, affine_tol(fa, live[ref], fb), "embedded")

    for e in (7, 8):
        set_flat(model, epoch_values(e))
        emb.after_step()
        emb.after_epoch()
    # 5 candidates left, floor(9/14 · 5) = 3: the next three drifters
    assert set(np.flatnonzero(emb.embedded_mask_).tolist()) == expected | set(
        drifting[2:5].tolist()
    )
    assert not emb.embedded_mask_[ref]


def test_fraction_one_embeds_everything_but_the_references():
    torch.manual_seed(1)
    model = TinyNet()
    emb = EmbeddedCMD(model, n_modes=2, warmup=3, every=1, fraction=1.0, n_samples=200)
    rng = np.random.default_rng(2)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.from_numpy(rng.normal(size=p.shape)).float())
        emb.after_epoch()
    refs = emb.online.reference_index_
    parameters = dict(model.named_parameters())
    trainable_refs = sum(name in parameters for name, _ in emb.online.reference_locations_)
    assert emb.n_weights_ == sum(p.numel() for p in model.parameters())
    assert emb.n_embedded_ == emb.n_weights_ - trainable_refs
    assert not emb.embedded_mask_[refs].any()


# --------------------------------------------------------------------------- training


def flat_parameters(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()


@pytest.fixture
def one_thread():
    # Tiny models: thread hand-offs would cost more than the arithmetic.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_loop_embedded_weights_follow_the_live_references(one_thread):
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(64, 6)
    y = torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    warmup, every, steps_per_epoch = 3, 2, 3
    emb = EmbeddedCMD(model, n_modes=3, warmup=warmup, every=every, fraction=0.3, n_samples=200)
    n_weights = sum(p.numel() for p in model.parameters())
    assert emb.n_weights_ == n_weights  # BatchNorm buffers are modelled, never embedded
    # where the parameters lie in the online model's flat order (buffers interleaved)
    position, start = [], 0
    for v in model.state_dict(keep_vars=True).values():
        if v.is_floating_point():
            if isinstance(v, nn.Parameter):
                position.append(np.arange(start, start + v.numel()))
            start += v.numel()
    position = np.concatenate(position)

    frozen_a = np.full(start, np.nan)
    frozen_b = np.full(start, np.nan)
    saved = 0
    n_steps = 0
    for epoch in range(1, 8):
        for s in range(steps_per_epoch):
            batch = slice(16 * s, 16 * (s + 1))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            embedded = emb.embedded_mask_[position]  # over the parameters' elements
            grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
            assert np.all(grads[embedded] == 0)  # hooks zeroed them
            before = flat_parameters(model)
            opt.step()
            saved += int(embedded.sum())
            n_steps += 1
            emb.after_step()

            now = flat_parameters(model)
            free = ~embedded
            assert (now[free] != before[free]).mean() > 0.8  # the others train
            if not embedded.any():
                continue
            state = model.state_dict()
            live = np.array(
                [state[name].reshape(-1)[i].item() for name, i in emb.online.reference_locations_]
            )
            g = position[embedded]
            r = live[emb.online.modes_[g]]
            expected = frozen_a[g] * r + frozen_b[g]
            tol = affine_tol(frozen_a[g], r, frozen_b[g])
            assert_within(now[embedded], expected, tol, "embedded weights")

        was = emb.embedded_mask_.copy()
        emb.after_epoch()
        new = emb.embedded_mask_ & ~was
        if new.any():  # frozen at the online fit of this epoch
            frozen_a[new] = emb.online.a_[new]
            frozen_b[new] = emb.online.b_[new]
        assert emb.online.is_warm_ == (epoch >= warmup)
        embedding_epoch = epoch > warmup and (epoch - warmup) % every == 0
        assert new.any() == embedding_epoch
        if epoch < warmup + every:
            assert emb.n_embedded_ == 0

    assert emb.n_steps_ == n_steps == 7 * steps_per_epoch
    assert emb.n_embedded_ > 0 and emb.embedded_fraction_ == emb.n_embedded_ / n_weights
    assert emb.updates_saved_ == pytest.approx(saved / (n_steps * n_weights), rel=1e-12)
    assert 0 < emb.updates_saved_ < emb.embedded_fraction_
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.device.type == "cpu"


def test_float64_model_keeps_its_dtype():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(8, 3, dtype=torch.float64)
    emb = EmbeddedCMD(model, n_modes=2, warmup=3, every=1, fraction=0.5)
    for _ in range(6):
        for _ in range(2):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            emb.after_step()
        emb.after_epoch()
    assert emb.n_embedded_ > 0
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_shared_parameters_count_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = self.a

    emb = EmbeddedCMD(Tied(), n_modes=1, warmup=3)
    assert emb.n_weights_ == 12
    assert emb.embedded_mask_.shape == (24,)  # both names are modelled


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every must be an integer >= 1, got 0"),
        ({"fraction": 0}, r"fraction must be a number in \(0, 1\], got 0"),
        ({"fraction": 1.5}, r"fraction must be a number in \(0, 1\], got 1.5"),
        ({"fraction": True}, r"fraction must be a number in \(0, 1\], got True"),
        ({"warmup": 1}, "warmup must be an integer >= 3, got 1"),
        ({"n_modes": 0}, "n_modes must be an integer >= 1, got 0"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(InputError, match=match):
        EmbeddedCMD(nn.Linear(2, 2), **kwargs)


def test_bad_models():
    with pytest.raises(InputError, match="torch.nn.Module, got dict"):
        EmbeddedCMD({})
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(InputError, match="no trainable floating-point parameters"):
        EmbeddedCMD(frozen)
