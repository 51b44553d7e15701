import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.metrics import adjusted_rand_score

from cmdcli import CMD
from cmdcli.errors import InputError, NotFittedError
from tests.planted import planted_modes
from tests.tolerances import assert_same_fit, model_bounds


@pytest.fixture(scope="module")
def planted():
    return planted_modes(n_weights=3000, n_checkpoints=25, n_modes=4, noise=1e-3, seed=0)


@pytest.fixture(scope="module")
def fitted(planted):
    # The paper's procedure: references are sampled weights, fitted exactly.
    return CMD(n_modes=4, n_samples=500, seed=0, references="sampled").fit(planted.W)


@pytest.fixture(scope="module")
def refined(planted):
    return CMD(n_modes=4, n_samples=500, seed=0).fit(planted.W)


@pytest.mark.parametrize("kind", ["fitted", "refined"])
def test_planted_modes_recovered(planted, kind, request):
    model = request.getfixturevalue(kind)
    assert model.n_modes_ == 4
    assert adjusted_rand_score(planted.labels, model.modes_) >= 0.99


def test_error_is_at_the_noise_floor(planted, fitted):
    # w = a·r + b + ε with a noisy reference r + ε_r: the residual is ε − a·ε_r,
    # so its RMS is σ·sqrt(mean(1 + a²)); a poor fit would be orders above it.
    resid = planted.W - fitted.reconstruct()
    floor = planted.noise * np.sqrt(np.mean(1 + planted.a**2))
    assert np.sqrt(np.mean(resid**2)) < 1.5 * floor
    assert fitted.explained_variance_ > 0.999


def test_references_are_planted_shapes_and_exact(planted, fitted):
    assert fitted.references_kind_ == "sampled" and len(fitted.reference_locations_) == 4
    for m, (tensor, i) in enumerate(fitted.reference_locations_):
        assert tensor == "weights"
        assert fitted.modes_[i] == m and fitted.a_[i] == 1.0 and fitted.b_[i] == 0.0
        r = fitted.references_[m]
        best = max(abs(np.corrcoef(r, s)[0, 1]) for s in planted.refs)
        assert best > 0.999
        np.testing.assert_array_equal(fitted.reconstruct()[i], planted.W[i].astype(np.float32))


def test_coefficients_recover_planted_affine_maps(planted, fitted):
    # each weight's a relative to its mode's reference weight equals a_i / a_ref
    for m, (_, i) in enumerate(fitted.reference_locations_):
        members = fitted.modes_ == m
        expected = planted.a[members] / planted.a[i]
        np.testing.assert_allclose(fitted.a_[members], expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("references", ["refined", "sampled", "robust"])
def test_same_seed_same_result_and_block_size_does_not_matter(planted, references):
    one = CMD(n_modes=4, n_samples=300, seed=7, references=references).fit(planted.W)
    two = CMD(n_modes=4, n_samples=300, seed=7, max_memory=50_000, references=references).fit(
        planted.W
    )
    again = CMD(n_modes=4, n_samples=300, seed=7, references=references).fit(planted.W)
    np.testing.assert_array_equal(one.a_, again.a_)
    np.testing.assert_array_equal(one.b_, again.b_)
    # pass 1 does not see the block size; pass 2 only through the order of its
    # float32 sums: both are the exact least squares to float32 rounding
    np.testing.assert_array_equal(one.references_, two.references_)
    bounds = model_bounds(one, planted.W)
    assert bounds.decided.all()  # planted modes: every weight clearly in one
    assert_same_fit((one.a_, one.b_, one.modes_), (two.a_, two.b_, two.modes_), bounds)


def test_dict_of_tensors_input_keeps_names(planted):
    W = planted.W
    # checkpoints on the last axis, as in the matrix (one row per weight)
    tensors = {"fc.weight": W[:2000].reshape(40, 50, -1), "fc.bias": W[2000:]}
    model = CMD(n_modes=4, seed=0).fit(tensors)
    assert list(model.tensor_sizes_) == ["fc.weight", "fc.bias"]
    assert model.tensor_slice("fc.bias") == slice(2000, 3000)
    assert model.reconstruct(-1, tensor="fc.bias").shape == (1000,)
    # flat order: each tensor row-major, as tensor.reshape(-1); planted noise 1e-3
    assert np.abs(model.reconstruct(tensor="fc.weight") - W[:2000]).max() < 0.01
    assert np.abs(model.reconstruct(tensor="fc.bias") - W[2000:]).max() < 0.01
    # state dicts stacked with axis=-1 give exactly this
    sds = [{"fc.weight": W[:2000, t].reshape(40, 50), "fc.bias": W[2000:, t]} for t in range(25)]
    stacked = {k: np.stack([sd[k] for sd in sds], axis=-1) for k in sds[0]}
    np.testing.assert_array_equal(stacked["fc.weight"], tensors["fc.weight"])


def test_dict_input_in_the_other_orientation_says_which_was_expected(planted):
    W = planted.W  # 25 checkpoints
    checkpoints_first = {"fc.weight": W[:2000].T.reshape(-1, 40, 50), "fc.bias": W[2000:].T}
    with pytest.raises(InputError) as info:
        CMD(n_modes=4).fit(checkpoints_first)
    message = str(info.value)
    assert "tensor 'fc.bias' has shape (25, 1000)" in message
    assert "expected (*tensor_shape, n_checkpoints): checkpoints on the last axis" in message
    assert "found 1000 here, 50 in 'fc.weight'" in message
    assert "first axis is 25" in message and "np.moveaxis(a, 0, -1)" in message
    with pytest.raises(InputError, match=r"tensor 'b' is a scalar"):
        CMD().fit({"a": W[:10], "b": np.float64(1.0)})
    with pytest.raises(InputError, match=r"no tensors given"):
        CMD().fit({})
    with pytest.raises(InputError, match=r"\(n_weights, n_checkpoints\), one row per weight"):
        CMD().fit(W[:, :, None])


def test_one_mode_puts_everything_in_mode_zero(planted):
    model = CMD(n_modes=1, seed=0).fit(planted.W)
    assert model.n_modes_ == 1 and np.all(model.modes_ == 0)


def test_reconstruct_selected_checkpoints(fitted):
    full = fitted.reconstruct()
    np.testing.assert_array_equal(fitted.reconstruct([0, -1]), full[:, [0, -1]])
    np.testing.assert_array_equal(fitted.reconstruct(3), full[:, 3])
    with pytest.raises(InputError, match="checkpoint index"):
        fitted.reconstruct(25)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_modes": 0}, "n_modes must be an integer >= 1 or .auto., got 0"),
        ({"n_samples": 2.5}, "n_samples must be an integer"),
        ({"seed": -1}, r"seed must be an integer in 0 … 2\*\*63-1"),
        ({"n_modes": 20, "n_samples": 10}, "n_modes=20 is more than the 10 sampled weights"),
    ],
)
def test_bad_parameters(planted, kwargs, match):
    with pytest.raises(InputError, match=match):
        CMD(**kwargs).fit(planted.W)


def test_bad_inputs():
    with pytest.raises(InputError, match="at least 3 checkpoints"):
        CMD().fit(np.zeros((10, 2)))
    W = np.ones((10, 5))
    W[3, 2] = np.nan
    with pytest.raises(InputError, match="NaN or Inf"):
        CMD().fit(W)
    with pytest.raises(InputError, match="shape"):
        CMD().fit(np.zeros(10))


def test_not_fitted():
    with pytest.raises(NotFittedError, match="not fitted"):
        CMD().reconstruct()


def test_save_load_roundtrip_readable_by_safetensors_alone(tmp_path, planted):
    W = planted.W
    model = CMD(n_modes=4, seed=0).fit({"w": W[:2000].reshape(40, 50, -1), "v": W[2000:]})
    path = tmp_path / "cmd.safetensors"
    model.save(path, shapes={"w": (40, 50), "v": (1000,)}, steps=range(10, 260, 10))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "cmd" and "format_version" in meta
        assert f.get_tensor("references").dtype == torch.float32
        assert tuple(f.get_tensor("references").shape) == (4, 25)
        assert f.get_tensor("steps").tolist() == list(range(10, 260, 10))
        assert tuple(f.get_tensor("a/w").shape) == (40, 50)
        assert f.get_tensor("b/v").dtype == torch.float32
        assert not f.get_tensor("mode/w").dtype.is_floating_point
    loaded = CMD.load(path)
    np.testing.assert_array_equal(loaded.a_, model.a_)
    np.testing.assert_array_equal(loaded.b_, model.b_)
    np.testing.assert_array_equal(loaded.modes_, model.modes_)
    np.testing.assert_array_equal(loaded.reconstruct(), model.reconstruct())
    assert loaded.shapes_ == {"w": (40, 50), "v": (1000,)}
    assert loaded.reference_locations_ == model.reference_locations_
    assert loaded.sample_index_.keys() == model.sample_index_.keys()
    for name, idx in model.sample_index_.items():
        np.testing.assert_array_equal(loaded.sample_index_[name], idx)
    np.testing.assert_array_equal(loaded.samples_, model.samples_)


def test_fit_straight_to_a_file_writes_what_save_writes(tmp_path, planted):
    # Names out of alphabetical order: the coefficients are laid out in model order.
    X = {"zeta": planted.W[:1200].reshape(30, 40, -1), "alpha": planted.W[1200:]}
    layout = {"shapes": {"zeta": (30, 40), "alpha": (1800,)}, "steps": range(25)}
    held = CMD(n_modes=4, seed=3, max_memory=40_000).fit(X)
    held.save(tmp_path / "saved.safetensors", **layout)
    streamed = CMD(n_modes=4, seed=3, max_memory=40_000).fit(
        X, out=tmp_path / "streamed.safetensors", **layout
    )
    saved = (tmp_path / "saved.safetensors").read_bytes()
    assert (tmp_path / "streamed.safetensors").read_bytes() == saved
    # the streamed fit keeps its coefficients on disk, mapped, not in memory
    assert isinstance(streamed.a_, np.memmap) and isinstance(streamed.modes_, np.memmap)
    np.testing.assert_array_equal(streamed.a_, held.a_)
    np.testing.assert_array_equal(streamed.modes_, held.modes_)
    loaded = CMD.load(tmp_path / "saved.safetensors")
    assert isinstance(loaded.b_, np.memmap)
    np.testing.assert_array_equal(loaded.b_, held.b_)
    np.testing.assert_array_equal(loaded.reconstruct(), held.reconstruct())
    with pytest.raises(ValueError, match="out=path"):
        CMD(n_modes=4).fit(X, steps=range(25))


def test_load_reads_files_whose_coefficients_are_not_adjacent(tmp_path, planted):
    # Files of earlier versions laid tensors out by name: a/v, a/w, b/v, … with the
    # model's order w, v. They cannot be mapped as one array and are read instead.
    from safetensors.torch import save_file

    model = CMD(n_modes=4, seed=0).fit({"w": planted.W[:2000], "v": planted.W[2000:]})
    path = tmp_path / "cmd.safetensors"
    model.save(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    save_file(tensors, str(path), metadata=meta)  # safetensors' own layout: by name
    loaded = CMD.load(path)
    assert not isinstance(loaded.a_, np.memmap)
    np.testing.assert_array_equal(loaded.a_, model.a_)
    np.testing.assert_array_equal(loaded.modes_, model.modes_)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(InputError, match="not a cmd model"):
        CMD.load(tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="no such model file"):
        CMD.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02junk")
    with pytest.raises(InputError, match="not a readable model file"):
        CMD.load(tmp_path / "junk.safetensors")


def test_saving_a_loaded_model_over_its_own_file_keeps_it(tmp_path, planted):
    # CMD.load maps the coefficients from the file: the new file is written beside
    # it and renamed over it, so the map still reads the old one whole.
    path = tmp_path / "cmd.safetensors"
    CMD(n_modes=4, seed=0).fit(planted.W).save(path)
    loaded = CMD.load(path)
    expected = np.array(loaded.a_)
    loaded.save(path)
    again = CMD.load(path)
    np.testing.assert_array_equal(again.a_, expected)
    assert np.count_nonzero(again.a_) > 0.9 * again.a_.size
    CMD(n_modes=4, seed=1).fit(planted.W, out=path)  # a new fit over a mapped file
    np.testing.assert_array_equal(np.array(loaded.a_), expected)  # old map intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmd.safetensors"]


def test_a_failed_streamed_fit_leaves_no_file(tmp_path, planted, monkeypatch):
    from cmdcli import fitting

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(fitting, "stream_fit", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        CMD(n_modes=4).fit(planted.W, out=tmp_path / "cmd.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_streamed_fit_checks_shapes_before_reading(planted, tmp_path):
    X = {"w": planted.W[:1000], "v": planted.W[1000:]}
    for shapes in ({"v": (2000,), "w": (1000,)}, {"w": (1000,)}, {"w": (10, 10), "v": (2000,)}):
        with pytest.raises(ValueError, match="shapes must give every modelled tensor"):
            CMD(n_modes=4).fit(X, out=tmp_path / "m.safetensors", shapes=shapes)
    assert not list(tmp_path.iterdir())


def test_a_full_disk_is_a_one_line_input_error(tmp_path, planted, monkeypatch):
    import errno
    import os

    from cmdcli.io import safetensors

    def full(fd, data, pos):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.os, "pwrite", full)
    with pytest.raises(InputError, match=r"cmd\.safetensors.*: cannot write \(No space left"):
        CMD(n_modes=4).fit(planted.W, out=tmp_path / "cmd.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n_checkpoints", [3, 40, 300])
def test_constant_weights_are_rebuilt_exactly_with_mode_zero(n_checkpoints):
    rng = np.random.default_rng(n_checkpoints)
    moving = rng.normal(size=(500, n_checkpoints)).cumsum(axis=1)
    # values that float32 cannot hold exactly, so their mean is rounded
    frozen = np.repeat(rng.uniform(-3, 3, (2000, 1)), n_checkpoints, axis=1)
    W = np.concatenate([moving, frozen]).astype(np.float32)
    model = CMD(n_modes=3, seed=0).fit(W)
    const = slice(500, None)
    assert np.all(model.modes_[const] == 0) and np.all(model.a_[const] == 0)
    np.testing.assert_array_equal(model.reconstruct()[const].astype(np.float32), W[const])
