"""Federated learning on digits: FedAvg against FedAvg with CMD (two modes), in bytes and accuracy.

Usage (from the repository root)::

    python examples/federated.py [--seeds 10] [--out DIR] [--iid] [--quick]

It writes ``federated.json`` and ``.md`` into DIR, by default
``./examples-out`` (ignored by git). The results quoted in ``examples/README.md``
are committed in ``examples/results/`` and are regenerated on purpose with
``--out examples/results`` (a ``--quick`` run refuses to go there).

Setting
-------
The digits task of ``examples/example_tasks.py`` (``DigitsMLP``, N = 6,570 float32
weights; 1347 training images, the 450 test images stay with the server). The
training images are split over C clients, by default *non-iid*: the images of
each class are divided among the clients in Dirichlet(α = 0.5) proportions
(``--iid`` deals them out uniformly at random instead). Every client takes part
in every round (full participation). A round: the server sends the global
weights, every client runs one epoch of plain SGD (fresh optimiser, no
momentum) on its own images, sends its weights back, and the server averages
them weighted by the clients' image counts (FedAvg). The seed sets the split,
the initial weights and every client's batch order; both protocols below see the
same ones, so their first rounds are identical and the comparison is paired.

Protocol 1: FedAvg (baseline)
    Every round, server -> each client: all N weights; each client -> server:
    all N weights.

Protocol 2: FedAvg with CMD (the paper's §4 idea, with embedded CMD)
    1. Rounds 1 … F (warm-up) are plain FedAvg. After every round the server
       feeds the global weights to ``cmdcli.online.OnlineCMD(n_modes=2,
       warmup=F)``: after round F it clusters the global model's round history
       into 2 modes with one reference weight each (real weights of the model),
       and from then on updates every weight's a_i, b_i (least squares over
       all rounds so far, by running sums) after each round. (The paper's FL
       experiment also uses 2 modes.)
    2. Embedding, with embedded CMD's rule (``cmdcli.embedded``): after round
       F + k·L (k = 1, 2, …) the server *embeds* ``fraction`` of the weights
       that are neither embedded nor references — those whose fitted
       trajectory moved least since the previous embedding, the first time
       since the end of the warm-up (``embedding_movement``: RMS over the
       rounds so far of Δa_i·r(t) + Δb_i, over the weight's std;
       ``least_moved``). So after k embeddings 1 − (1 − fraction)^k of the
       weights are embedded. An embedded weight is from then on *defined* as
       w_i = a_i·r_m(i) + b_i with its (a_i, b_i) (float32) frozen at that
       moment. References are never embedded.
    3. With the next round's download the server sends, once, each newly
       embedded weight's index (int32), a_i, b_i (float32) and mode (uint8) —
       13 bytes a weight — and, the first time, the flat indices of the 2
       references (int32).
    4. During local training a client trains as usual but, after every
       optimiser step, overwrites its embedded weights with a_i·r_m(i) + b_i
       from its *current* reference values (embedded CMD). It uploads only the
       weights that are not embedded (the references among them); the embedded
       ones are implied by its references.
    5. The server averages the uploaded weights as FedAvg does and sets each
       embedded weight to a_i·r̄_m(i) + b_i from the averaged references. This
       is exactly the FedAvg average of the clients' embedded weights (an
       affine map commutes with a weighted mean whose weights sum to 1), so
       aggregation loses nothing; what CMD changes is training, since embedded
       weights can only move with their reference.
    6. Download of a round: the global values of the weights that are not
       embedded (clients compute the embedded ones), plus the messages of step 3.

Baseline at equal cost: "FedAvg stopped at CMD's uplink budget" is FedAvg's own
run read after the last round whose cumulative uplink fits in what CMD uploads
over the whole run (the simplest way to send as little; no extra training).

Bytes counted: 4 per float32 value, 4 per int32 index, 1 per uint8 mode. Uplink
= client -> server, summed over clients and rounds; downlink = server -> client,
counted once per receiving client (a unicast to each; a true broadcast would
divide it by C). The very first download (the initial weights) is counted for
both protocols. No protocol overhead (headers, compression) is counted.

Outputs ``OUT/federated.json`` (settings, per-seed numbers, mean ± std, mean
accuracy per round) and ``OUT/federated.md`` (the table). ``--quick`` runs one
seed for a few rounds (a smoke test, not a result).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from example_tasks import (  # noqa: E402
    DEFAULT_OUT,
    describe_machine,
    evaluate,
    fmt_delta,
    fmt_pm,
    load_task,
    mean_std,
    output_directory,
)

__all__ = [
    "BYTES_PER_EMBEDDING",
    "BYTES_PER_INDEX",
    "BYTES_PER_VALUE",
    "FedSettings",
    "main",
    "render_markdown",
    "round_traffic",
    "run_federated",
    "simulate",
    "split_clients",
]

BYTES_PER_VALUE = 4  # float32 weight or coefficient
BYTES_PER_INDEX = 4  # int32 flat index
BYTES_PER_MODE = 1  # uint8 mode id
BYTES_PER_EMBEDDING = BYTES_PER_INDEX + 2 * BYTES_PER_VALUE + BYTES_PER_MODE  # index, a, b, mode

PROTOCOLS = ("fedavg", "cmd")
# Rows of the table: the two protocols, and FedAvg stopped once it has sent as much as
# CMD sends in the whole run (read off FedAvg's own accuracy curve; no extra run).
ROWS = ("fedavg", "fedavg_same_uplink", "cmd")
LABELS = {
    "fedavg": "FedAvg (all weights every round)",
    "fedavg_same_uplink": "FedAvg stopped at CMD's uplink budget",
    "cmd": "FedAvg + CMD, 2 modes",
}


@dataclass
class FedSettings:
    """Everything that defines the simulation (written to the results)."""

    n_clients: int = 10
    iid: bool = False
    alpha: float = 0.5
    rounds: int = 60
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.2
    n_modes: int = 2
    warmup: int = 10
    every: int = 2
    fraction: float = 0.1
    n_samples: int = 1000

    @classmethod
    def quick(cls) -> FedSettings:
        """A few rounds with few clients: exercises both protocols, not a result."""
        return cls(n_clients=4, rounds=7, warmup=3, every=1, fraction=0.25, n_samples=300)

    def embedding_rounds(self) -> list[int]:
        """Rounds after which the server embeds more weights (1-based)."""
        return list(range(self.warmup + self.every, self.rounds + 1, self.every))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["embedding_rounds"] = self.embedding_rounds()
        return d


def round_traffic(
    n_clients: int, n_free: int, n_new_embedded: int = 0, n_new_references: int = 0
) -> tuple[int, int]:
    """Bytes (uplink, downlink) of one round, summed over the clients.

    Parameters
    ----------
    n_clients : int
        Clients taking part in the round.
    n_free : int
        Weights that are not embedded during this round (references included);
        each travels down and up as one float32 value.
    n_new_embedded : int, default=0
        Weights embedded since the previous round: their index, a, b and mode go
        down once.
    n_new_references : int, default=0
        Reference indices announced with this round's download.

    Returns
    -------
    (int, int)
        Client -> server and server -> client bytes.
    """
    up = n_clients * n_free * BYTES_PER_VALUE
    down = n_clients * (
        n_free * BYTES_PER_VALUE
        + n_new_embedded * BYTES_PER_EMBEDDING
        + n_new_references * BYTES_PER_INDEX
    )
    return up, down


def split_clients(
    y: np.ndarray, n_clients: int, *, iid: bool, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Indices of each client's training samples.

    ``iid``: a random permutation dealt out in equal parts. Otherwise every
    class's samples are divided in Dirichlet(``alpha``) proportions; drawn again
    until every client has at least ``batch``-sized data (10 samples).
    """
    n = len(y)
    if iid:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), n_clients)]
    classes = np.unique(y)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_clients, alpha))) * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts[:-1])):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= 10:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise RuntimeError("could not draw a split with at least 10 samples per client")


class _Flat:
    """Moves between a model's parameters and one flat float32 vector, in state-dict order."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        params = dict(model.named_parameters())
        state = model.state_dict()
        if list(names) != [k for k, v in state.items() if v.is_floating_point()] or set(
            names
        ) != set(params):
            raise ValueError("the example expects a model whose state dict is its parameters")
        self.params = [params[n] for n in names]

    def get(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @torch.no_grad()
    def set(self, flat: torch.Tensor) -> None:
        start = 0
        for p in self.params:
            p.copy_(flat[start : start + p.numel()].view_as(p))
            start += p.numel()


@dataclass
class _Embedding:
    """What the server has announced: embedded weights and their frozen coefficients."""

    ref_index: torch.Tensor  # (M,) flat indices of the references
    index: torch.Tensor  # (E,) flat indices of the embedded weights
    a: torch.Tensor  # (E,) float32
    b: torch.Tensor  # (E,) float32
    mode: torch.Tensor  # (E,) int64

    @classmethod
    def empty(cls, ref_index: np.ndarray) -> _Embedding:
        return cls(
            ref_index=torch.from_numpy(np.asarray(ref_index, dtype=np.int64)),
            index=torch.zeros(0, dtype=torch.int64),
            a=torch.zeros(0),
            b=torch.zeros(0),
            mode=torch.zeros(0, dtype=torch.int64),
        )

    def extend(self, chosen: np.ndarray, a: np.ndarray, b: np.ndarray, modes) -> None:
        """Embed the weights ``chosen`` with the coefficients ``a, b`` (full-length arrays)."""
        modes = np.asarray(modes, dtype=np.int64)
        self.index = torch.cat([self.index, torch.from_numpy(chosen)])
        self.a = torch.cat([self.a, torch.from_numpy(a[chosen]).float()])
        self.b = torch.cat([self.b, torch.from_numpy(b[chosen]).float()])
        self.mode = torch.cat([self.mode, torch.from_numpy(modes[chosen])])

    def apply(self, flat: torch.Tensor) -> None:
        """Overwrite the embedded weights of ``flat`` from its own reference values."""
        if self.index.numel():
            refs = flat[self.ref_index]
            flat[self.index] = self.a * refs[self.mode] + self.b


def _choose_embeddings(
    online, since: tuple[np.ndarray, np.ndarray], embedded: np.ndarray, ref_index, cfg
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The weights to embed now (embedded CMD's rule), and the new baseline coefficients."""
    from cmdcli.embedded import embedding_movement, least_moved

    a_now, b_now = online.a_.copy(), online.b_.copy()  # float32, as announced
    _, w_var, r_mean, r_var = online.trajectory_moments()
    moved = embedding_movement(*since, a_now, b_now, online.modes_, r_mean, r_var, w_var)
    candidates = ~embedded
    candidates[ref_index] = False
    chosen = np.sort(least_moved(moved, candidates, cfg.fraction))
    return chosen, (a_now, b_now)


def _local_train(
    model: torch.nn.Module,
    flat: _Flat,
    start: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    cfg: FedSettings,
    gen: torch.Generator,
    embedding: _Embedding | None,
) -> torch.Tensor:
    flat.set(start)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.local_epochs):
        perm = torch.randperm(X.shape[0], generator=gen)
        for s in range(0, X.shape[0], cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            optimizer.step()
            if embedding is not None and embedding.index.numel():
                w = flat.get()
                embedding.apply(w)
                flat.set(w)
    return flat.get()


def simulate(protocol: str, cfg: FedSettings, seed: int) -> dict:
    """One federated run with ``protocol`` (``"fedavg"`` or ``"cmd"``); returns its record."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    task = load_task("digits")
    rng = np.random.default_rng(seed)
    parts = split_clients(
        task.y_train.numpy(), cfg.n_clients, iid=cfg.iid, alpha=cfg.alpha, rng=rng
    )
    sizes = np.array([len(p) for p in parts], dtype=np.float64)
    weights = torch.from_numpy(sizes / sizes.sum()).float()

    torch.manual_seed(seed)
    model = task.model_class()
    names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    numels = [int(np.prod(shapes[k])) for k in names]
    offsets = dict(zip(names, np.cumsum([0, *numels])[:-1].tolist()))
    flat = _Flat(model, names)
    global_w = flat.get().clone()
    n_weights = global_w.numel()

    def as_state(vec: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            k: vec[offsets[k] : offsets[k] + n].reshape(shapes[k]).clone()
            for k, n in zip(names, numels)
        }

    online = None
    if protocol == "cmd":
        from cmdcli.online import OnlineCMD

        online = OnlineCMD(
            n_modes=cfg.n_modes, warmup=cfg.warmup, n_samples=cfg.n_samples, seed=seed
        )
    embedding: _Embedding | None = None
    embedded = np.zeros(n_weights, dtype=bool)
    pending_new, pending_refs = 0, 0  # announced with the next download
    since: tuple[np.ndarray, np.ndarray] | None = None
    ref_index = np.zeros(0, dtype=np.int64)
    up_total = down_total = 0
    curve, per_round = [], []
    embedding_rounds = set(cfg.embedding_rounds())
    t0 = time.perf_counter()

    for rnd in range(1, cfg.rounds + 1):
        n_free = int(n_weights - embedded.sum())
        up, down = round_traffic(cfg.n_clients, n_free, pending_new, pending_refs)
        up_total += up
        down_total += down
        per_round.append({"round": rnd, "n_free": n_free, "uplink": up, "downlink": down})
        pending_new = pending_refs = 0

        uploads = []
        for k, part in enumerate(parts):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + rnd * 1009 + k)
            idx = torch.from_numpy(part)
            uploads.append(
                _local_train(
                    model,
                    flat,
                    global_w,
                    task.X_train[idx],
                    task.y_train[idx],
                    cfg,
                    gen,
                    embedding,
                )
            )
        stacked = torch.stack(uploads)  # (C, N); only the free columns are "sent"
        free = torch.from_numpy(~embedded)
        new_global = global_w.clone()
        new_global[free] = (weights[:, None] * stacked[:, free]).sum(dim=0)
        if embedding is not None:
            embedding.apply(new_global)
        global_w = new_global
        if online is not None:
            online.update(as_state(global_w))
            if online.is_warm_ and since is None:
                # End of the warm-up: the coefficients later changes are measured from.
                since = (online.a_.copy(), online.b_.copy())
                ref_index = np.asarray(online.reference_index_, dtype=np.int64)
            elif online.is_warm_ and rnd in embedding_rounds:
                chosen, since = _choose_embeddings(online, since, embedded, ref_index, cfg)
                if embedding is None:
                    pending_refs = len(ref_index)
                    embedding = _Embedding.empty(ref_index)
                embedding.extend(chosen, since[0], since[1], online.modes_)
                embedded[chosen] = True
                pending_new = len(chosen)
                # The server's copy follows the frozen coefficients from now on.
                embedding.apply(global_w)
        curve.append(evaluate(task, as_state(global_w))["accuracy"])

    return {
        "protocol": protocol,
        "seed": seed,
        "accuracy": curve[-1],
        "curve": curve,
        "uplink_bytes": up_total,
        "downlink_bytes": down_total,
        "embedded_fraction": float(embedded.mean()),
        "n_weights": int(n_weights),
        "n_references": int(len(ref_index)),
        "client_sizes": [int(s) for s in sizes],
        "per_round": per_round,
        "time_s": time.perf_counter() - t0,
    }


def _bsw(diff: np.ndarray) -> list[int]:
    """Seeds better / the same / worse (accuracy differences below 1e-9 are ties)."""
    return [int((diff > 1e-9).sum()), int((np.abs(diff) <= 1e-9).sum()), int((diff < -1e-9).sum())]


def _stopped_early(fedavg: dict, uplink_budget: int) -> dict:
    """FedAvg's record cut after the last round whose total uplink fits in the budget."""
    spent, rounds = 0, 0
    for r in fedavg["per_round"]:
        if spent + r["uplink"] > uplink_budget:
            break
        spent += r["uplink"]
        rounds += 1
    rounds = max(rounds, 1)
    kept = fedavg["per_round"][:rounds]
    return {
        **fedavg,
        "protocol": "fedavg_same_uplink",
        "accuracy": fedavg["curve"][rounds - 1],
        "curve": fedavg["curve"][:rounds],
        "uplink_bytes": sum(r["uplink"] for r in kept),
        "downlink_bytes": sum(r["downlink"] for r in kept),
        "per_round": kept,
    }


def run_federated(
    seeds: Sequence[int], cfg: FedSettings | None = None, *, log: Callable[[str], None] = print
) -> dict:
    """Both protocols for every seed; returns the results dict written to JSON."""
    cfg = cfg or FedSettings()
    torch.set_num_threads(1)
    start = time.perf_counter()
    records = []
    for seed in seeds:
        for protocol in PROTOCOLS:
            rec = simulate(protocol, cfg, seed)
            records.append(rec)
            log(
                f"[seed {seed} {protocol:6s}] accuracy {100 * rec['accuracy']:.2f}%  "
                f"up {rec['uplink_bytes'] / 1e6:.2f} MB  down {rec['downlink_bytes'] / 1e6:.2f} MB"
                f"  embedded {100 * rec['embedded_fraction']:.0f}%  ({rec['time_s']:.1f}s, "
                f"total {time.perf_counter() - start:.0f}s)"
            )
    by = {p: [r for r in records if r["protocol"] == p] for p in PROTOCOLS}
    by["fedavg_same_uplink"] = [
        _stopped_early(base, cmd["uplink_bytes"]) for base, cmd in zip(by["fedavg"], by["cmd"])
    ]
    by = {p: by[p] for p in ROWS}
    base_acc = np.array([r["accuracy"] for r in by["fedavg"]])
    base_up = np.array([r["uplink_bytes"] for r in by["fedavg"]], dtype=np.float64)
    base_total = np.array(
        [r["uplink_bytes"] + r["downlink_bytes"] for r in by["fedavg"]], dtype=np.float64
    )
    summary = {}
    for p, rows in by.items():
        acc = np.array([r["accuracy"] for r in rows])
        up = np.array([r["uplink_bytes"] for r in rows], dtype=np.float64)
        down = np.array([r["downlink_bytes"] for r in rows], dtype=np.float64)
        summary[p] = {
            "accuracy": mean_std(acc),
            "delta_vs_fedavg": mean_std(acc - base_acc),
            "uplink_bytes": mean_std(up),
            "downlink_bytes": mean_std(down),
            "total_bytes": mean_std(up + down),
            "uplink_vs_fedavg": mean_std(up / base_up),
            "total_vs_fedavg": mean_std((up + down) / base_total),
            "embedded_fraction": mean_std([r["embedded_fraction"] for r in rows]),
        }
        summary[p]["better_same_worse_than_fedavg"] = _bsw(acc - base_acc)
        if p == "fedavg_same_uplink":
            summary[p]["rounds"] = mean_std([len(r["curve"]) for r in rows])
        else:
            summary[p]["mean_curve"] = np.mean([r["curve"] for r in rows], axis=0).tolist()
    gap = np.array([r["accuracy"] for r in by["cmd"]]) - np.array(
        [r["accuracy"] for r in by["fedavg_same_uplink"]]
    )
    summary["cmd"]["delta_vs_same_uplink"] = mean_std(gap)
    summary["cmd"]["better_same_worse_than_same_uplink"] = _bsw(gap)
    n_weights = sum(p.numel() for p in load_task("digits").model_class().parameters())
    return {
        "experiment": "federated",
        "settings": {**cfg.as_dict(), "seeds": list(seeds), "n_weights": n_weights},
        "protocols": summary,
        "runs": records,
        "machine": describe_machine(),
        "elapsed_s": time.perf_counter() - start,
    }


def _label(row: str, summary: dict) -> str:
    if row == "fedavg_same_uplink":
        r = summary["rounds"]
        lo, hi = min(r["values"]), max(r["values"])
        return (
            f"{LABELS[row]} (round {lo:.0f})"
            if lo == hi
            else f"{LABELS[row]} (rounds {lo:.0f}–{hi:.0f})"
        )
    return LABELS[row]


def render_markdown(results: dict) -> str:
    """The results table, as markdown."""
    s = results["settings"]
    n_seeds = len(s["seeds"])
    split = "iid" if s["iid"] else f"non-iid (Dirichlet α = {s['alpha']} per class)"
    lines = [
        f"### Federated digits, {s['n_clients']} clients, {split}, {s['rounds']} rounds "
        f"(mean ± std over {n_seeds} seeds)",
        "",
        "Δ: paired difference to FedAvg's final accuracy in the same seed (mean ± std); b/s/w: "
        "seeds where the row was better / the same / worse than FedAvg. MB = 10^6 bytes, "
        "summed over all clients and rounds.",
        "",
        "| protocol | test accuracy (%) | Δ vs FedAvg (pts) | b/s/w | uplink (MB) "
        "| downlink (MB) | total (MB) | uplink vs FedAvg | weights embedded at the end |",
        "|---|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for p in ROWS:
        m = results["protocols"][p]
        delta = "—" if p == "fedavg" else fmt_delta(m["delta_vs_fedavg"])
        bsw = "—" if p == "fedavg" else "/".join(map(str, m["better_same_worse_than_fedavg"]))
        ratio = f"{100 * m['uplink_vs_fedavg']['mean']:.1f}%"
        lines.append(
            f"| {_label(p, m)} | {fmt_pm(m['accuracy'], 100.0)} | {delta} | {bsw} | "
            f"{m['uplink_bytes']['mean'] / 1e6:.2f} | {m['downlink_bytes']['mean'] / 1e6:.2f} | "
            f"{m['total_bytes']['mean'] / 1e6:.2f} | {ratio} | "
            f"{100 * m['embedded_fraction']['mean']:.0f}% |"
        )
    cmd = results["protocols"]["cmd"]
    b, same, w = cmd["better_same_worse_than_same_uplink"]
    lines += [
        "",
        "At equal uplink, CMD against FedAvg stopped at CMD's budget: Δ = "
        f"{fmt_delta(cmd['delta_vs_same_uplink'])} pts; better in {b}, the same in {same}, "
        f"worse in {w} of {n_seeds} seeds.",
    ]
    curve_rounds = sorted({1, s["warmup"], *range(10, s["rounds"] + 1, 10), s["rounds"]})
    lines += [
        "",
        "Mean test accuracy (%) after round:",
        "",
        "| protocol | " + " | ".join(str(r) for r in curve_rounds) + " |",
        "|---|" + "---:|" * len(curve_rounds),
    ]
    for p in PROTOCOLS:
        c = results["protocols"][p]["mean_curve"]
        lines.append(f"| {p} | " + " | ".join(f"{100 * c[r - 1]:.1f}" for r in curve_rounds) + " |")
    lines += [
        "",
        f"Settings: N = {s['n_weights']} float32 weights (DigitsMLP); each round every client "
        f"trains {s['local_epochs']} local epoch (plain SGD, lr {s['lr']}, batch "
        f"{s['batch_size']}). CMD: M = {s['n_modes']} modes fitted by OnlineCMD on the global "
        f"model after a FedAvg warm-up of F = {s['warmup']} rounds (K = {s['n_samples']} "
        f"sampled weights), then {100 * s['fraction']:.0f}% of the not yet embedded weights "
        f"embedded every L = {s['every']} rounds. Bytes: 4 per float32 value, 13 per "
        f"embedded weight announcement (index, a, b, mode), downlink counted per client; "
        f"seeds {s['seeds']}. "
        f"Machine: {results['machine']['cpu']} ({results['machine']['cpu_count']} cores, "
        f"torch {results['machine']['torch']}, 1 thread); whole run "
        f"{results['elapsed_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``federated.json`` and ``federated.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "federated.json"
    md_path = out_dir / "federated.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(results), encoding="utf-8")
    return json_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds (0 … n−1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output directory [default: ./examples-out]; --out examples/results "
        "regenerates the committed results (full runs only)",
    )
    parser.add_argument("--iid", action="store_true", help="iid split instead of Dirichlet")
    parser.add_argument("--quick", action="store_true", help="1 seed, few rounds (smoke test)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    try:
        out = output_directory(args.out, args.quick)
    except ValueError as exc:
        parser.error(str(exc))
    cfg = FedSettings.quick() if args.quick else FedSettings()
    cfg.iid = args.iid
    seeds = list(range(1 if args.quick else args.seeds))
    results = run_federated(seeds, cfg)
    json_path, md_path = write_results(results, out)
    print(render_markdown(results))
    print(f"wrote {json_path} and {md_path} ({results['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
