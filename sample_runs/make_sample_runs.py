"""Regenerate the bundled digits sample runs from scratch.

Usage::

    python sample_runs/make_sample_runs.py

Trains two small models on scikit-learn's bundled digits data set (no network
access needed) and writes one checkpoint per epoch:

* ``sample_runs/digits_mlp/``: ``DigitsMLP`` (64-64-32-10), SGD with momentum,
  40 epochs, plain ``torch.save(state_dict)`` files ``epoch_<n>.pt``.
* ``sample_runs/digits_cnn/``: ``DigitsCNN`` (two conv + BatchNorm layers),
  SGD with momentum, 30 epochs, Hugging Face Trainer layout
  ``checkpoint-<global_step>/{model.safetensors,config.json,trainer_state.json}``.

Old checkpoints in those directories are deleted first; the hand-written
``evaluate.py`` files are left alone.  The run is deterministic on CPU (fixed
seeds, deterministic algorithms, one thread) and takes a few seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from digits import DigitsCNN, DigitsMLP, accuracy_and_loss, load_digits_split  # noqa: E402

BATCH_SIZE = 32

MLP_SEED = 0
MLP_EPOCHS = 40
MLP_LR = 0.05

CNN_SEED = 1
CNN_EPOCHS = 30
CNN_LR = 0.05


def _set_determinism() -> None:
    torch.set_num_threads(1)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception:  # pragma: no cover - very old torch
        pass


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
) -> tuple[float, int]:
    """One pass over (X, y) in shuffled mini-batches; returns (mean loss, steps)."""
    model.train()
    perm = torch.randperm(X.shape[0], generator=generator)
    total, steps = 0.0, 0
    for start in range(0, X.shape[0], BATCH_SIZE):
        idx = perm[start : start + BATCH_SIZE]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        optimizer.step()
        total += float(loss.item()) * idx.numel()
        steps += 1
    return total / X.shape[0], steps


def _clear_run_dir(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for child in run_dir.iterdir():
        if child.is_file() and re.fullmatch(r"epoch_\d+\.pt", child.name):
            child.unlink()
        elif child.is_dir() and re.fullmatch(r"checkpoint-\d+", child.name):
            shutil.rmtree(child)


def _fmt(m: dict[str, float]) -> str:
    return f"accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f}"


def make_mlp_run(run_dir: Path) -> list[dict]:
    data = load_digits_split()
    _clear_run_dir(run_dir)
    torch.manual_seed(MLP_SEED)
    model = DigitsMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=MLP_LR, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=MLP_EPOCHS)
    gen = torch.Generator().manual_seed(MLP_SEED)

    history = []
    step = 0
    for epoch in range(1, MLP_EPOCHS + 1):
        train_loss, steps = _train_epoch(model, optimizer, data["X_train"], data["y_train"], gen)
        step += steps
        scheduler.step()
        torch.save(model.state_dict(), run_dir / f"epoch_{epoch}.pt")
        test = accuracy_and_loss(model, data["X_test"], data["y_test"])
        history.append({"epoch": epoch, "step": step, "train_loss": train_loss, **test})
        print(f"[digits_mlp] epoch {epoch:2d}  train loss {train_loss:.4f}  test {_fmt(test)}")

    n_params = sum(p.numel() for p in model.parameters())
    _write_run_readme(
        run_dir,
        title="digits_mlp: MLP on scikit-learn digits, 40 plain PyTorch checkpoints",
        body=f"""\
A real (small) training run: `DigitsMLP` from `../digits.py` (Linear 64->64, ReLU,
Linear 64->32, ReLU, Linear 32->10; {n_params} parameters, all float32) trained on
scikit-learn's bundled digits data (`load_digits`, 8x8 images flattened to 64 pixels
scaled to [0, 1]; stratified 75/25 split with `random_state=0`: 1347 train / 450 test).

Training: SGD (momentum 0.9, lr {MLP_LR} with cosine annealing to 0 over {MLP_EPOCHS}
epochs), batch size {BATCH_SIZE}, cross-entropy loss, seed {MLP_SEED}, CPU,
deterministic algorithms, 1 thread.

Layout: one `torch.save(model.state_dict(), "epoch_<n>.pt")` file after each epoch,
n = 1..{MLP_EPOCHS} (not zero-padded: sort numerically). Keys: `fc1.weight`,
`fc1.bias`, `fc2.weight`, `fc2.bias`, `fc3.weight`, `fc3.bias`. The files load with
`torch.load(path, weights_only=True)`.

`evaluate.py` defines `evaluate(state_dict) -> {{"accuracy", "loss"}}` on the held-out
test split.""",
        history=history,
        first_name="epoch_1.pt",
        last_name=f"epoch_{MLP_EPOCHS}.pt",
    )
    return history


def make_cnn_run(run_dir: Path) -> list[dict]:
    from safetensors.torch import save_file

    data = load_digits_split()
    _clear_run_dir(run_dir)
    torch.manual_seed(CNN_SEED)
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=CNN_LR, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=CNN_EPOCHS)
    gen = torch.Generator().manual_seed(CNN_SEED)
    config = {
        "model_type": "digits_cnn",
        "architectures": ["DigitsCNN"],
        "num_labels": 10,
        "image_size": 8,
        "num_channels": 1,
        "torch_dtype": "float32",
    }

    history = []
    log_history = []
    step = 0
    for epoch in range(1, CNN_EPOCHS + 1):
        train_loss, steps = _train_epoch(model, optimizer, data["X_train"], data["y_train"], gen)
        step += steps
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()
        test = accuracy_and_loss(model, data["X_test"], data["y_test"])
        history.append({"epoch": epoch, "step": step, "train_loss": train_loss, **test})
        log_history.append(
            {
                "epoch": float(epoch),
                "step": step,
                "loss": round(train_loss, 6),
                "learning_rate": lr_used,
                "eval_accuracy": round(test["accuracy"], 6),
                "eval_loss": round(test["loss"], 6),
            }
        )

        ckpt = run_dir / f"checkpoint-{step}"
        ckpt.mkdir()
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
        (ckpt / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        trainer_state = {
            "global_step": step,
            "epoch": float(epoch),
            "max_steps": None,  # filled in below once known
            "num_train_epochs": CNN_EPOCHS,
            "train_batch_size": BATCH_SIZE,
            "log_history": list(log_history),
        }
        (ckpt / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        print(
            f"[digits_cnn] epoch {epoch:2d}  step {step:4d}  "
            f"train loss {train_loss:.4f}  test {_fmt(test)}"
        )

    # Every epoch has the same number of steps, so max_steps is known at the end;
    # patch it into every trainer_state.json (as the HF Trainer would have had it).
    for ckpt in run_dir.glob("checkpoint-*"):
        path = ckpt / "trainer_state.json"
        ts = json.loads(path.read_text())
        ts["max_steps"] = step
        path.write_text(json.dumps(ts, indent=2) + "\n")

    n_params = sum(p.numel() for p in model.parameters())
    first_step = history[0]["step"]
    _write_run_readme(
        run_dir,
        title="digits_cnn: small CNN on scikit-learn digits, Hugging Face Trainer layout",
        body=f"""\
A real (small) training run: `DigitsCNN` from `../digits.py` on the 8x8 digit images
reshaped to 1x8x8 (Conv2d(1,8,3,pad 1) + BatchNorm2d(8) + ReLU, Conv2d(8,16,3,pad 1)
+ BatchNorm2d(16) + ReLU + MaxPool2d(2), Flatten, Linear(256,10); {n_params} trainable
parameters, float32) trained on scikit-learn's bundled digits data (pixels scaled to
[0, 1]; stratified 75/25 split with `random_state=0`: 1347 train / 450 test).

Training: SGD (momentum 0.9, lr {CNN_LR} with cosine annealing to 0 over {CNN_EPOCHS}
epochs), batch size {BATCH_SIZE} ({first_step} optimizer steps per epoch), cross-entropy
loss, seed {CNN_SEED}, CPU, deterministic algorithms, 1 thread.

Layout (as written by the Hugging Face `Trainer`, one checkpoint per epoch):
`checkpoint-<global_step>/` with `model.safetensors` (the full `state_dict`, including
BatchNorm `running_mean`/`running_var` float32 buffers and the int64 scalar
`num_batches_tracked` buffers), `config.json` and `trainer_state.json`
(`global_step`, `epoch`, `log_history`, ...). `global_step` is the number of optimizer
steps so far ({first_step} x epoch), so directories are `checkpoint-{first_step}` ...
`checkpoint-{step}` (sort numerically).

`evaluate.py` defines `evaluate(state_dict) -> {{"accuracy", "loss"}}` on the held-out
test split (BatchNorm in eval mode, i.e. using the running statistics).""",
        history=history,
        first_name=f"checkpoint-{first_step}",
        last_name=f"checkpoint-{step}",
    )
    return history


def _write_run_readme(
    run_dir: Path, title: str, body: str, history: list[dict], first_name: str, last_name: str
) -> None:
    first, last = history[0], history[-1]
    rows = "\n".join(
        f"| {h['epoch']} | {h['step']} | {h['train_loss']:.4f} "
        f"| {h['accuracy']:.4f} | {h['loss']:.4f} |"
        for h in history
    )
    first_at = f"(`{first_name}`, epoch {first['epoch']})"
    last_at = f"(`{last_name}`, epoch {last['epoch']})"
    text = f"""# {title}

{body}

Test accuracy at the first checkpoint {first_at}: **{first["accuracy"]:.4f}**
(test loss {first["loss"]:.4f}).
Test accuracy at the last checkpoint {last_at}: **{last["accuracy"]:.4f}**
(test loss {last["loss"]:.4f}).

Regenerate (deterministic, a few seconds on CPU) from the repository root:

```
python sample_runs/make_sample_runs.py
```

This file is written by that script.

## Per-epoch metrics

| epoch | global step | train loss | test accuracy | test loss |
|---|---|---|---|---|
{rows}
"""
    (run_dir / "README.md").write_text(text)


def main() -> None:
    _set_determinism()
    mlp = make_mlp_run(HERE / "digits_mlp")
    cnn = make_cnn_run(HERE / "digits_cnn")
    print()
    print(f"digits_mlp final test accuracy: {mlp[-1]['accuracy']:.4f} (loss {mlp[-1]['loss']:.4f})")
    print(f"digits_cnn final test accuracy: {cnn[-1]['accuracy']:.4f} (loss {cnn[-1]['loss']:.4f})")


if __name__ == "__main__":
    main()
