import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from cmdcli import fitting
from cmdcli.errors import InputError, NotFittedError
from cmdcli.model import CMD
from cmdcli.online import OnlineCMD, choose_online_references
from tests.builders import TinyNet, tiny_state_dicts
from tests.planted import planted_modes
from tests.tolerances import U32, U64, affine_tol, assert_within, float64_fit_bounds

N_CKPT = 25
WARMUP = 10


@pytest.fixture(scope="module")
def planted():
    return planted_modes(n_weights=3000, n_checkpoints=N_CKPT, n_modes=4, noise=1e-3, seed=0)


@pytest.fixture(scope="module")
def w32(planted):
    # What the online model sees: every value rounded to float32.
    return planted.W.astype(np.float32).astype(np.float64)


def batch_least_squares(W, refs, modes):
    """a, b of every row of W on [r_mode, 1], by numpy's lstsq, mode by mode."""
    a = np.empty(len(W))
    b = np.empty(len(W))
    t = W.shape[1]
    for m in range(len(refs)):
        members = modes == m
        design = np.stack([refs[m], np.ones(t)], axis=1)
        sol = np.linalg.lstsq(design, W[members].T, rcond=None)[0]
        a[members], b[members] = sol
    return a, b


@pytest.fixture(scope="module")
def history(planted, w32):
    """Feed the planted run; keep (a_, b_, references_, modes_, EV) after chosen updates."""
    online = OnlineCMD(n_modes=4, warmup=WARMUP, n_samples=500, seed=0)
    seen = {}
    for t in range(N_CKPT):
        online.update_flat(planted.W[:, t])
        if t + 1 in (WARMUP, WARMUP + 1, 17, N_CKPT):
            seen[t + 1] = (
                online.a_.copy(),
                online.b_.copy(),
                online.references_.copy(),
                online.modes_.copy(),
                online.explained_variance_,
            )
    return online, seen


@pytest.mark.parametrize("n_updates", [WARMUP, WARMUP + 1, 17, N_CKPT])
def test_coefficients_equal_batch_least_squares(w32, history, n_updates):
    online, seen = history
    a, b, refs, modes, ev = seen[n_updates]
    assert refs.shape == (online.n_modes_, n_updates)
    W = w32[:, :n_updates]
    # references are the reference weights' own (float32) values
    np.testing.assert_array_equal(refs, W[online.reference_index_])
    a_ls, b_ls = batch_least_squares(W, refs.astype(np.float64), modes)
    # float64 running sums against float64 lstsq, both stored in float32
    _, _, a_tol, b_tol = float64_fit_bounds(W, refs, modes)
    assert_within(a, a_ls, a_tol, "a")
    assert_within(b, b_ls, b_tol, "b")
    # explained variance of the stored float32 coefficients, over every update so far
    fit = a[:, None].astype(np.float64) * refs.astype(np.float64)[modes] + b[:, None]
    resid = ((W - fit) ** 2).sum()
    var = ((W - W.mean(axis=1, keepdims=True)) ** 2).sum()
    assert ev == pytest.approx(1 - resid / var, abs=1e-9)


def test_planted_modes_recovered_and_references_exact(planted, w32, history):
    online, _ = history
    assert online.n_modes_ == 4
    assert adjusted_rand_score(planted.labels, online.modes_) >= 0.95
    for m, ((tensor, i), flat) in enumerate(
        zip(online.reference_locations_, online.reference_index_)
    ):
        assert tensor == "weights" and i == flat
        assert online.modes_[i] == m
        assert online.a_[i] == 1.0 and online.b_[i] == 0.0
        best = max(abs(np.corrcoef(online.references_[m], s)[0, 1]) for s in planted.refs)
        assert best > 0.999
    assert online.explained_variance_ > 0.999


def test_warmup_keeps_weights_and_hides_the_model():
    sds = tiny_state_dicts(6, seed=1, noise=1e-3)
    for sd in sds:
        sd["fc2.bias"] = sd["fc2.bias"].double() + 1e-12  # not float32-representable
    online = OnlineCMD(n_modes=2, warmup=4, seed=0)
    with pytest.raises(NotFittedError, match="no update"):
        online.state_dict()
    for t in range(3):
        online.update(sds[t])
        assert online.n_updates_ == t + 1 and not online.is_warm_
        out = online.state_dict()
        assert list(out) == list(sds[t])
        for name, v in sds[t].items():
            assert out[name].dtype == v.dtype
            torch.testing.assert_close(out[name], v, rtol=0, atol=0)
        for attr in ("a_", "b_", "modes_", "references_", "reference_locations_"):
            with pytest.raises(NotFittedError, match="warming up"):
                getattr(online, attr)
        with pytest.raises(NotFittedError):
            online.to_cmd()
    online.update(sds[3])
    assert online.is_warm_ and online.references_.shape[1] == 4


def robust_case(rng, n_members=20, noise=1e-2):
    t = np.linspace(0, 1, 12)
    r = np.sin(3 * t) + t
    a = rng.uniform(0.5, 2.0, n_members) * rng.choice([-1, 1], n_members)
    b = rng.normal(size=n_members)
    members = a[:, None] * r + b[:, None] + noise * rng.normal(size=(n_members, len(t)))
    return r, members


def test_robust_references_reject_a_nearly_constant_member():
    rng = np.random.default_rng(3)
    r, members = robust_case(rng)
    tiny = 0.3 + 1e-5 * r  # clean but barely moving: the paper's rule loves it
    samples = np.vstack([members[:7], tiny, members[7:]])
    abs_corr = fitting.abs_correlation(samples)
    modes = np.zeros(len(samples), dtype=np.int64)
    assert fitting.choose_references(abs_corr, modes)[0] == 7
    chosen = choose_online_references(samples, abs_corr, modes)[0]
    assert chosen != 7
    # it is the member whose affine fit explains the others best
    xc = samples - samples.mean(axis=1, keepdims=True)
    ss = (xc**2).sum(axis=1)
    resid = [(ss * (1 - abs_corr[j] ** 2)).sum() if j != 7 else np.inf for j in range(21)]
    assert chosen == int(np.argmin(resid))


def test_robust_references_reject_a_large_noisy_member():
    rng = np.random.default_rng(4)
    r, members = robust_case(rng, noise=1e-3)
    loud = 100 * r + 20 * rng.normal(size=len(r))  # huge, but a third of it noise
    samples = np.vstack([members, loud])
    abs_corr = fitting.abs_correlation(samples)
    modes = np.zeros(len(samples), dtype=np.int64)
    xc = samples - samples.mean(axis=1, keepdims=True)
    ss = (xc**2).sum(axis=1)
    resid = np.array([(ss * (1 - abs_corr[j] ** 2)).sum() for j in range(len(samples))])
    assert int(np.argmin(resid)) == 20  # residual alone would take the noisy giant
    chosen = choose_online_references(samples, abs_corr, modes)[0]
    assert chosen != 20
    assert chosen == int(np.argmin(resid[:20]))


def test_online_fit_avoids_a_nearly_constant_reference():
    # Whole pipeline: 1 mode, every weight sampled; the float32-rounded tiny
    # weight is still the paper's best-connected member, never the reference.
    rng = np.random.default_rng(5)
    t = np.linspace(0, 1, 10)
    r = np.sin(3 * t) + t
    W = rng.uniform(0.5, 2, (40, 1)) * r + rng.normal(size=(40, 1))
    W += 1e-2 * rng.normal(size=W.shape)
    W[13] = 0.3 + 1e-5 * r
    online = OnlineCMD(n_modes=1, warmup=10, n_samples=100, seed=0)
    for k in range(10):
        online.update_flat(W[:, k])
    samples = online.samples_.astype(np.float64)
    plain = fitting.choose_references(fitting.abs_correlation(samples), np.zeros(40, np.int64))
    assert plain[0] == 13
    assert online.reference_index_[0] != 13


def test_constant_reference_gives_zero_slope_and_the_mean():
    # 35 weights constant during warm-up form the largest mode; its reference is
    # the first of them (all tie) and stays constant, while the others move later.
    rng = np.random.default_rng(6)
    T, F = 14, 5
    t = np.linspace(0, 1, T)
    W = np.empty((50, T))
    W[:35] = rng.normal(size=(35, 1))
    W[35:] = rng.uniform(0.5, 2, (15, 1)) * np.sin(3 * t) + rng.normal(size=(15, 1))
    W[1:35, F:] += rng.normal(size=(34, T - F))
    online = OnlineCMD(n_modes=2, warmup=F, n_samples=100, seed=0)
    for k in range(T):
        online.update_flat(W[:, k])
    assert online.reference_index_[0] == 0 and np.all(online.modes_[:35] == 0)
    w32 = W.astype(np.float32).astype(np.float64)
    assert online.a_[0] == 1.0 and online.b_[0] == 0.0
    np.testing.assert_array_equal(online.a_[1:35], 0.0)
    _, b_exact, _, b_tol = float64_fit_bounds(w32, online.references_, online.modes_)
    np.testing.assert_array_equal(b_exact[1:35], w32[1:35].mean(axis=1))  # a = 0: the mean
    assert_within(online.b_[1:35], b_exact[1:35], b_tol[1:35], "b of constant weights")


def test_module_and_state_dict_give_the_same():
    sds = tiny_state_dicts(8, seed=2, noise=1e-3)
    by_dict = OnlineCMD(n_modes=2, warmup=4, n_samples=50, seed=1)
    by_module = OnlineCMD(n_modes=2, warmup=4, n_samples=50, seed=1)
    net = TinyNet()
    for sd in sds:
        by_dict.update(sd)
        net.load_state_dict(sd)
        by_module.update(net)
    np.testing.assert_array_equal(by_dict.a_, by_module.a_)
    np.testing.assert_array_equal(by_dict.b_, by_module.b_)
    np.testing.assert_array_equal(by_dict.modes_, by_module.modes_)
    one, two = by_dict.state_dict(), by_module.state_dict()
    assert list(one) == list(two)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=0)


def test_state_dict_is_the_cmd_model_with_names_shapes_dtypes():
    sds = tiny_state_dicts(9, seed=3)
    for sd in sds:
        sd["fc1.bias"] = sd["fc1.bias"].half()
        sd["fc2.bias"] = sd["fc2.bias"].double()
        sd["empty"] = torch.zeros(0)  # no elements: passed through, not modelled
    online = OnlineCMD(n_modes=2, warmup=4, n_samples=60, seed=0)
    for sd in sds:
        online.update(sd)
    out = online.state_dict()
    last = sds[-1]
    assert list(out) == list(last)
    assert (
        "empty" not in online.tensor_sizes_ and "bn.num_batches_tracked" not in online.tensor_sizes_
    )
    assert torch.equal(out["bn.num_batches_tracked"], last["bn.num_batches_tracked"])
    assert out["bn.num_batches_tracked"].item() == 90  # the latest, not the first
    r_last = online.references_[:, -1].astype(np.float64)
    start = 0
    for name, size in online.tensor_sizes_.items():
        sl = slice(start, start + size)
        expected = online.a_[sl].astype(np.float64) * r_last[online.modes_[sl]] + online.b_[sl]
        assert out[name].dtype == last[name].dtype and out[name].shape == last[name].shape
        torch.testing.assert_close(
            out[name], torch.from_numpy(expected).to(last[name].dtype).reshape(last[name].shape)
        )
        # and the weights themselves: exact two-mode data (fp16 rounding aside)
        assert (out[name].double() - last[name].double()).abs().max() < 5e-3
        start += size


def test_to_cmd_reconstructs_like_online_and_survives_save_load(tmp_path):
    sds = tiny_state_dicts(10, seed=4, noise=1e-3)
    online = OnlineCMD(n_modes=2, warmup=5, n_samples=60, seed=0)
    for k, sd in enumerate(sds):
        online.update(sd, step=100 * (k + 1))
    cmd = online.to_cmd()
    assert isinstance(cmd, CMD)
    flat = np.concatenate(
        [
            v.reshape(-1).double().numpy()
            for k, v in online.state_dict().items()
            if k in online.tensor_sizes_
        ]
    )
    # the same a·r + b in float64; the state dict holds it rounded to float32
    assert_within(cmd.reconstruct(-1), flat, U32 * np.abs(flat) * (1 + U32), "last checkpoint")
    full = cmd.reconstruct()
    expected = (
        online.a_[:, None].astype(np.float64) * online.references_[online.modes_]
        + online.b_[:, None]
    )
    r = online.references_[online.modes_].astype(np.float64)
    assert_within(full, expected, affine_tol(online.a_[:, None], r, online.b_[:, None], U64), "all")
    assert cmd.samples_.shape == (60, 10) and cmd.explained_variance_ == pytest.approx(
        online.explained_variance_
    )
    assert cmd.statistics_.mode_size.sum() == sum(online.tensor_sizes_.values())

    path = tmp_path / "cmd.safetensors"
    cmd.save(path, shapes=cmd.shapes_, steps=cmd.steps_)
    loaded = CMD.load(path)
    np.testing.assert_array_equal(loaded.steps_, [100 * (k + 1) for k in range(10)])
    np.testing.assert_array_equal(loaded.a_, online.a_)
    np.testing.assert_array_equal(loaded.b_, online.b_)
    np.testing.assert_array_equal(loaded.modes_, online.modes_)
    np.testing.assert_array_equal(loaded.references_, online.references_)
    assert loaded.reference_locations_ == [tuple(x) for x in online.reference_locations_]
    assert loaded.shapes_ == online.shapes_
    np.testing.assert_array_equal(loaded.reconstruct(-1), cmd.reconstruct(-1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_modes": 0}, "n_modes must be an integer >= 1, got 0"),
        ({"n_modes": "3"}, "n_modes must be an integer >= 1, got '3'"),
        ({"warmup": 2}, "warmup must be an integer >= 3, got 2"),
        ({"n_samples": 0}, "n_samples must be an integer >= 1, got 0"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"warmup": True}, "warmup must be an integer >= 3, got True"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(InputError, match=match):
        OnlineCMD(**kwargs)


def test_bad_updates():
    sds = tiny_state_dicts(2, seed=0)
    online = OnlineCMD(n_modes=2, warmup=3).update(sds[0])

    bad = dict(sds[1], **{"fc1.weight": torch.zeros(4, 6)})
    with pytest.raises(InputError, match=r"'fc1.weight'.*expected shape \(5, 6\), found \(4, 6\)"):
        online.update(bad)
    bad = {k: v for k, v in sds[1].items() if k != "bn.bias"}
    with pytest.raises(InputError, match="'bn.bias' is missing"):
        online.update(bad)
    with pytest.raises(InputError, match="'extra' .*not in the first update"):
        online.update(dict(sds[1], extra=torch.zeros(3)))
    with pytest.raises(InputError, match=r"'fc2.bias'.*expected dtype torch.float32, found"):
        online.update(dict(sds[1], **{"fc2.bias": sds[1]["fc2.bias"].double()}))
    nan = sds[1]["fc2.bias"].clone()
    nan[0] = float("nan")
    with pytest.raises(InputError, match="'fc2.bias' at update 1: contains NaN"):
        online.update(dict(sds[1], **{"fc2.bias": nan}))
    with pytest.raises(InputError, match="update_flat|update\\(\\)"):
        online.update_flat(np.zeros(10))
    with pytest.raises(InputError, match="torch.nn.Module or a state dict, got list"):
        online.update([1, 2])
    with pytest.raises(InputError, match="step must be an integer, got 1.5"):
        online.update(sds[1], step=1.5)
    assert online.n_updates_ == 1  # nothing bad was taken in
    online.update(sds[1])
    assert online.n_updates_ == 2

    flat = OnlineCMD(n_modes=2, warmup=3).update_flat(np.zeros(10))
    with pytest.raises(InputError, match="expected 10 weights, found 9"):
        flat.update_flat(np.zeros(9))
    with pytest.raises(InputError, match="floating point, got int64"):
        OnlineCMD().update_flat(np.arange(10))
    with pytest.raises(InputError, match=r"shape \(n_weights,\), got shape \(2, 5\)"):
        OnlineCMD().update_flat(np.zeros((2, 5)))
    with pytest.raises(InputError, match="n_modes=5 is more than the 4 sampled weights"):
        OnlineCMD(n_modes=5).update_flat(np.zeros(4))
    with pytest.raises(InputError, match="no floating-point tensors"):
        OnlineCMD().update({"step": torch.tensor(3)})
