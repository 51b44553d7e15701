"""The example experiments (examples/): smoke runs in quick mode, and their bookkeeping."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tolerances import U32, gamma

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    """Import examples/<name>.py by path (the examples are scripts, not a package)."""
    module_name = f"_cmdcli_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def te():
    return _load("training_experiment")


@pytest.fixture(scope="module")
def fe():
    return _load("federated")


@pytest.fixture(scope="module")
def tasks():
    return _load("example_tasks")


def _expected_embedding_counts(n_weights, n_refs, fraction, n_embeddings):
    """Weights embedded by each embedding: floor(fraction · candidates), candidates shrinking."""
    counts, embedded = [], 0
    for _ in range(n_embeddings):
        k = math.floor(fraction * (n_weights - n_refs - embedded) + 1e-9)
        counts.append(k)
        embedded += k
    return counts


# --------------------------------------------------------------------------- training experiment


def test_training_experiment_quick_writes_sane_results(tmp_path, te, monkeypatch, capsys):
    import cmdcli.embedded

    made = []

    class Recording(cmdcli.embedded.EmbeddedCMD):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(cmdcli.embedded, "EmbeddedCMD", Recording)
    assert te.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out

    results = json.loads((tmp_path / "training_experiment.json").read_text())
    md = (tmp_path / "training_experiment.md").read_text()
    cfg = te.ExperimentSettings.quick()
    assert set(results["tasks"]) == {"digits", "diabetes"}
    assert results["settings"]["seeds"] == [0]
    assert results["settings"]["n_modes"] == cfg.n_modes
    assert results["elapsed_s"] > 0
    assert len(results["runs"]) == 2 == len(made)

    for run, emb in zip(results["runs"], made):
        for method in te.METHODS:
            assert 0.0 <= run["accuracy"][method] <= 1.0, (run["task"], method)
            assert math.isfinite(run["loss"][method])
        saved = run["embedded"]["updates_saved"]
        assert 0.0 <= saved <= 1.0
        # The number in the file is the one EmbeddedCMD reported ...
        assert saved == emb.updates_saved_
        assert run["embedded"]["embedded_fraction"] == emb.embedded_fraction_
        # ... and follows the documented schedule: warm after `warmup` epochs, then an
        # embedding after every epoch (every=1); an embedding saves the updates of the
        # epochs after it, and every epoch has the same number of steps.
        epochs = cfg.tasks[run["task"]].epochs
        n_embeddings = epochs - cfg.warmup
        counts = _expected_embedding_counts(
            run["embedded"]["n_weights"],
            run["embedded"]["n_references"],
            cfg.fraction,
            n_embeddings,
        )
        live = np.cumsum([0] * cfg.warmup + [0] + counts[:-1])  # embedded during each epoch
        assert len(live) == epochs
        assert saved == pytest.approx(live.sum() / (epochs * run["embedded"]["n_weights"]))
        assert run["embedded"]["n_embedded"] == sum(counts)

    for name, task in results["tasks"].items():
        methods = task["methods"]
        assert set(methods) == set(te.METHODS)
        sgd = methods["sgd"]["accuracy"]["values"]
        for method, m in methods.items():
            values = m["accuracy"]["values"]
            assert m["accuracy"]["mean"] == pytest.approx(np.mean(values))
            assert m["delta_vs_sgd"]["values"] == pytest.approx(np.subtract(values, sgd).tolist())
            assert sum(m["better_same_worse_than_sgd"]) == 1
            assert te.LABELS[method] in md
        assert methods["sgd"]["delta_vs_sgd"]["mean"] == 0.0
        assert 0.0 <= task["embedded_updates_saved"]["mean"] <= 1.0
        assert name in md


def test_ema_and_swa_on_hand_made_weights(tasks):
    states = [{"w": torch.tensor([float(v), 2.0 * v])} for v in (1.0, 2.0, 4.0)]
    ema = tasks.ema_average(states, decay=0.5)
    # ema = 0.5·(0.5·w1 + 0.5·w2) + 0.5·w3 = 0.25 + 0.5 + 2
    assert torch.allclose(ema["w"], torch.tensor([2.75, 5.5]))
    swa = tasks.swa_average(states, start=2)
    assert torch.allclose(swa["w"], torch.tensor([3.0, 6.0]))
    assert torch.allclose(tasks.swa_average(states, start=1)["w"], torch.tensor([7 / 3, 14 / 3]))


def test_mean_std_uses_the_sample_standard_deviation(tasks):
    stat = tasks.mean_std([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["std"] == pytest.approx(1.0)
    assert tasks.mean_std([0.5])["std"] == 0.0


def test_diabetes_task_is_a_balanced_binary_split(tasks):
    task = tasks.load_task("diabetes")
    assert task.X_train.shape == (331, 10) and task.X_test.shape == (111, 10)
    # Cut at the training median: about half of the training labels are 1.
    assert abs(float(task.y_train.float().mean()) - 0.5) < 0.01
    # standardised in float64 (mean 0), stored in float32 (u·|x| each), averaged in
    # float32 in whatever order: |mean| ≤ u·mean|x| + γ_n·mean|x|
    n = task.X_train.shape[0]
    tol = (U32 + gamma(n)) * task.X_train.abs().double().mean(dim=0)
    assert bool((task.X_train.mean(dim=0).double().abs() <= tol).all())
    with pytest.raises(ValueError, match="unknown task"):
        tasks.load_task("cifar")


# --------------------------------------------------------------------------- federated


def test_round_traffic_on_a_hand_made_case(fe):
    # 3 clients, 100 weights, nothing embedded: 100 float32 each way per client.
    assert fe.round_traffic(3, 100) == (3 * 100 * 4, 3 * 100 * 4)
    # 80 weights still free, 20 newly embedded (index 4 + a 4 + b 4 + mode 1 = 13 bytes)
    # and the 2 reference indices announced (4 bytes each).
    up, down = fe.round_traffic(3, 80, n_new_embedded=20, n_new_references=2)
    assert up == 3 * 80 * 4 == 960
    assert down == 3 * (80 * 4 + 20 * 13 + 2 * 4) == 1764


def test_federated_quick_writes_sane_results(tmp_path, fe, capsys):
    assert fe.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    results = json.loads((tmp_path / "federated.json").read_text())
    md = (tmp_path / "federated.md").read_text()
    cfg = fe.FedSettings.quick()
    protocols = results["protocols"]
    assert set(protocols) == {"fedavg", "fedavg_same_uplink", "cmd"}
    for p, m in protocols.items():
        assert 0.0 <= m["accuracy"]["mean"] <= 1.0
        assert fe.LABELS[p] in md
    for p in ("fedavg", "cmd"):
        assert len(protocols[p]["mean_curve"]) == cfg.rounds
        assert all(0.0 <= a <= 1.0 for a in protocols[p]["mean_curve"])
    assert protocols["cmd"]["uplink_bytes"]["mean"] < protocols["fedavg"]["uplink_bytes"]["mean"]
    assert protocols["cmd"]["total_bytes"]["mean"] < protocols["fedavg"]["total_bytes"]["mean"]
    assert 0.0 < protocols["cmd"]["embedded_fraction"]["mean"] < 1.0

    runs = {r["protocol"]: r for r in results["runs"]}
    n, c = results["settings"]["n_weights"], cfg.n_clients
    assert n == 6570
    # FedAvg: every client sends and receives all N float32 weights every round.
    assert runs["fedavg"]["uplink_bytes"] == cfg.rounds * c * n * 4
    assert runs["fedavg"]["downlink_bytes"] == cfg.rounds * c * n * 4
    # CMD: full rounds until the first embedding takes effect, then the free weights only.
    cmd = runs["cmd"]
    counts = _expected_embedding_counts(
        n, cmd["n_references"], cfg.fraction, len(cfg.embedding_rounds())
    )
    free = np.full(cfg.rounds, n)
    for k, after in enumerate(cfg.embedding_rounds()):
        free[after:] -= counts[k]  # takes effect from the next round on
    assert [r["n_free"] for r in cmd["per_round"]] == free.tolist()
    assert cmd["uplink_bytes"] == c * 4 * int(free.sum())
    # Embeddings go down with the next round's download (none after the last round);
    # the reference indices with the first of them.
    sent = [k for k, after in zip(counts, cfg.embedding_rounds()) if after < cfg.rounds]
    announced = 13 * sum(sent) + (4 * cmd["n_references"] if sent else 0)
    assert cmd["downlink_bytes"] == c * (4 * int(free.sum()) + announced)
    assert cmd["embedded_fraction"] == pytest.approx(sum(counts) / n)
    # FedAvg at CMD's uplink budget: as many full rounds as CMD's uplink pays for.
    early = protocols["fedavg_same_uplink"]
    k = cmd["uplink_bytes"] // (c * n * 4)
    assert early["rounds"]["values"] == [k]
    assert early["uplink_bytes"]["values"] == [k * c * n * 4]
    assert early["accuracy"]["values"] == [runs["fedavg"]["curve"][k - 1]]
    # Both protocols see the same split and batches: identical until CMD first embeds.
    first = cfg.embedding_rounds()[0]
    assert cmd["curve"][: first - 1] == runs["fedavg"]["curve"][: first - 1]


def test_split_clients_partitions_the_data(fe):
    y = np.repeat(np.arange(10), 30)
    rng = np.random.default_rng(0)
    for iid in (True, False):
        parts = fe.split_clients(y, 6, iid=iid, alpha=0.5, rng=rng)
        joined = np.concatenate(parts)
        assert len(parts) == 6 and min(len(p) for p in parts) >= 10
        assert np.array_equal(np.sort(joined), np.arange(len(y)))  # disjoint, complete
    iid_sizes = [len(p) for p in fe.split_clients(y, 7, iid=True, alpha=0.5, rng=rng)]
    assert max(iid_sizes) - min(iid_sizes) <= 1


def test_server_average_of_embedded_weights_equals_the_model_at_the_mean_reference(fe):
    """Why the protocol need not upload embedded weights: FedAvg of a·r_c+b is a·r̄+b."""
    gen = torch.Generator().manual_seed(0)
    n = 50
    emb = fe._Embedding.empty(np.array([3, 7]))
    chosen = np.array([0, 5, 9, 20, 41])
    a = torch.randn(n, generator=gen).numpy().astype(np.float32)
    b = torch.randn(n, generator=gen).numpy().astype(np.float32)
    modes = np.arange(n) % 2
    emb.extend(chosen, a, b, modes)
    clients = torch.randn(4, n, generator=gen, dtype=torch.float64)
    for row in clients:
        emb.apply(row)  # each client's embedded weights follow its own references
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    averaged = (p[:, None] * clients).sum(dim=0)
    server = averaged.clone()
    emb.apply(server)
    assert torch.allclose(server, averaged, atol=1e-6)
    r = averaged[[3, 7]]
    expected = (
        torch.from_numpy(a[chosen]).double() * r[modes[chosen]]
        + torch.from_numpy(b[chosen]).double()
    )
    assert torch.allclose(averaged[chosen], expected, atol=1e-6)


def test_a_diverging_embedded_run_is_reported_not_fatal(te, monkeypatch):
    import cmdcli.embedded

    class Diverging(cmdcli.embedded.EmbeddedCMD):
        def after_step(self):
            super().after_step()
            if self.n_steps_ == 3 * 11 + 5:  # in epoch 4 of diabetes (11 steps an epoch)
                with torch.no_grad():
                    next(self.model.parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(cmdcli.embedded, "EmbeddedCMD", Diverging)
    cfg = te.ExperimentSettings.quick()
    cfg.tasks = {"diabetes": cfg.tasks["diabetes"]}
    results = te.run_experiment([0, 1], cfg, log=lambda line: None)
    for run in results["runs"]:
        assert run["embedded"]["diverged_at_epoch"] == 4
        assert run["accuracy"]["embedded_cmd"] is None
        assert run["accuracy"]["embedded_cmd_weights"] is None
        assert 0.0 <= run["accuracy"]["online_cmd"] <= 1.0
    methods = results["tasks"]["diabetes"]["methods"]
    assert methods["embedded_cmd"]["n_diverged"] == 2
    assert methods["embedded_cmd"]["accuracy"]["values"] == []
    assert methods["sgd"]["n_diverged"] == 0
    assert "2 diverged" in te.render_markdown(results)


# --------------------------------------------------------------------------- outputs


def _committed(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "results").iterdir())}


def test_smoke_runs_write_to_examples_out_not_the_committed_results(fe, tmp_path, monkeypatch):
    before = _committed(EXAMPLES)
    monkeypatch.chdir(tmp_path)
    assert fe.main(["--quick"]) == 0  # the default --out
    assert sorted(p.name for p in (tmp_path / "examples-out").iterdir()) == [
        "federated.json",
        "federated.md",
    ]
    assert _committed(EXAMPLES) == before


@pytest.mark.parametrize("script", ["training_experiment", "federated"])
def test_quick_runs_refuse_the_committed_results(script, te, fe, capsys):
    module = {"training_experiment": te, "federated": fe}[script]
    before = _committed(EXAMPLES)
    with pytest.raises(SystemExit) as exc:
        module.main(["--quick", "--out", str(EXAMPLES / "results")])
    assert exc.value.code == 2
    assert "smoke test" in capsys.readouterr().err
    assert _committed(EXAMPLES) == before


def test_the_default_output_is_ignored_by_git():
    ignored = (EXAMPLES.parent / ".gitignore").read_text().splitlines()
    assert "/examples-out/" in ignored and "/digits-cmd/" in ignored
