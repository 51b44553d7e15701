"""Real training runs written by the Hugging Face stack (transformers Trainer, PEFT, accelerate),
by Lightning, and by a faithful re-implementation of timm's ``CheckpointSaver``.

Every builder trains a tiny model for real on synthetic data (deterministic seeds, one CPU
thread) and lets the framework's own saving code write the checkpoints.  The expected weights in
the returned :class:`FrameworkRun` are read back from the files on disk, never taken from the
in-memory training copies.  Nothing touches the network: every model is built from a config.

Timings on the 2-core test machine (one builder, warm imports): see ``test_hf_builders.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

from .common import FrameworkRun, StateDict  # noqa: E402

__all__ = [
    "build_hf_trainer",
    "build_hf_trainer_sharded",
    "build_peft_trainer",
    "build_accelerate",
    "build_accelerate_bin",
    "build_lightning",
    "build_timm_style",
    "TinyRegressor",
    "TinyConvNet",
]

# --------------------------------------------------------------------------------------------
# shared helpers


def _text(s: str) -> str:
    """A notes paragraph written across source lines, as one line."""
    return " ".join(s.split())


def _one_thread() -> None:
    torch.set_num_threads(1)


def _clone(sd: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in sd.items()}


def _safetensors_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _index_of(name: str, pattern: str) -> int:
    m = re.fullmatch(pattern, name)
    if m is None:
        raise ValueError(f"{name!r} does not match {pattern!r}")
    return int(m.group(1))


def _listed(holder: Path, pattern: str) -> list[str]:
    """Entries of ``holder`` whose name matches ``pattern`` (one integer group), by that integer."""
    names = [p.name for p in holder.iterdir() if re.fullmatch(pattern, p.name)]
    return sorted(names, key=lambda n: _index_of(n, pattern))


class _CountingLM(torch.utils.data.Dataset):
    """Token rows that count up by a per-row stride (1 or 2) modulo the vocabulary.

    The next token is predictable from the two before it, so a tiny LM learns it smoothly."""

    def __init__(self, n: int = 64, seq_len: int = 8, vocab: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 3, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _regression_data(seed: int, n: int = 64, d_in: int = 8, d_out: int = 4):
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, d_out, generator=g)
    return x, torch.sin(x @ w / 2)


_TRAINER_SIDE_FILES = (
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "training_args.bin",
    "scaler.pt",
)


def _trainer_skipped(root: Path, names: list[str]) -> list[str]:
    return [f"{n}/{f}" for n in names for f in _TRAINER_SIDE_FILES if (root / n / f).exists()]


def _trainer_args(out: Path, *, save_steps: int, n_checkpoints: int, seed: int, lr: float):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=save_steps * n_checkpoints,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=None,
        learning_rate=lr,
        logging_steps=save_steps,
        report_to=[],
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_level="error",
    )


def _trainer_steps(root: Path, names: list[str]) -> list[int]:
    """Steps from each checkpoint's trainer_state.json ``global_step``, checked against the name."""
    steps = []
    for n in names:
        state = json.loads((root / n / "trainer_state.json").read_text())
        step = int(state["global_step"])
        if step != _index_of(n, r"checkpoint-(\d+)"):
            raise AssertionError(f"{n}: trainer_state.json global_step is {step}")
        steps.append(step)
    return steps


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loggers = [
            logging.getLogger(n)
            for n in (
                "transformers",
                "lightning",
                "lightning.pytorch",
                "lightning.fabric",
                "accelerate",
                "peft",
            )
        ]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)


# --------------------------------------------------------------------------------------------
# 1 and 7: transformers Trainer on a tiny GPT-2


def _tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )


def _hf_weight_names(path: Path) -> list[str]:
    """Tensor names stored in a save_pretrained folder (single file or sharded index)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if single.exists():
        return _safetensors_names(single)
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def _hf_read_weights(path: Path) -> StateDict:
    """The weights of a save_pretrained folder as stored (all shards merged for a sharded one)."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(path / "model.safetensors"))
    weight_map = json.loads(index.read_text())["weight_map"]
    out: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        out.update(load_file(str(path / shard)))
    if set(out) != set(weight_map):
        raise AssertionError(f"{path}: shards hold {sorted(out)}, index lists {sorted(weight_map)}")
    return out


def _hf_load_back(path: Path) -> StateDict:
    """``GPT2LMHeadModel.from_pretrained(dir)``, strict; the model tensors under the file names."""
    from transformers import GPT2LMHeadModel

    path = Path(path)
    _one_thread()
    with _quiet():
        model, info = GPT2LMHeadModel.from_pretrained(str(path), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise AssertionError(f"from_pretrained({path}) was not clean: {problems}")
    sd = model.state_dict()
    names = _hf_weight_names(path)
    absent = [n for n in names if n not in sd]
    if absent:
        raise AssertionError(f"file tensors not in the model: {absent}")
    return {n: sd[n].detach().clone() for n in names}


class _ShardOnSave:
    """A TrainerCallback (duck-typed base added at run time) that re-writes each checkpoint's
    weights with ``save_pretrained(max_shard_size=...)`` right after the Trainer saved it."""

    def __init__(self, max_shard_size: str):
        self.max_shard_size = max_shard_size

    def on_save(self, args, state, control, model=None, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # save_pretrained does not delete a single-file model.safetensors when it writes shards
        # next to it; remove the Trainer's single file first so the folder is a clean sharded save.
        (ckpt / "model.safetensors").unlink()
        model.save_pretrained(str(ckpt), max_shard_size=self.max_shard_size)
        return control


def _train_gpt2(out: Path, *, n_checkpoints: int, seed: int, callbacks=()):
    from transformers import GPT2LMHeadModel, Trainer

    _one_thread()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(_tiny_gpt2_config())
    args = _trainer_args(out, save_steps=2, n_checkpoints=n_checkpoints, seed=seed, lr=1e-2)
    with _quiet():
        trainer = Trainer(
            model=model, args=args, train_dataset=_CountingLM(seed=seed), callbacks=list(callbacks)
        )
        trainer.train()


def build_hf_trainer(tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0) -> FrameworkRun:
    """transformers ``Trainer`` on a tiny GPT2LMHeadModel, save_strategy="steps", save_steps=2."""
    root = Path(tmp_path) / "hf_trainer"
    _train_gpt2(root, n_checkpoints=n_checkpoints, seed=seed)
    names = _listed(root, r"checkpoint-(\d+)")
    if len(names) < n_checkpoints:
        raise AssertionError(f"Trainer wrote {names}")
    return FrameworkRun(
        framework="hf-trainer",
        root=root,
        names=names,
        steps=_trainer_steps(root, names),
        weights=[load_file(str(root / n / "model.safetensors")) for n in names],
        skipped=_trainer_skipped(root, names),
        load_back=_hf_load_back,
        load_back_native=_hf_load_back,
        notes=_text("""
            root/checkpoint-<global_step>/ with model.safetensors (metadata {'format': 'pt'}),
            config.json, generation_config.json, trainer_state.json, optimizer.pt, scheduler.pt,
            rng_state.pth, training_args.bin. Step = the number in the folder name =
            trainer_state.json 'global_step'. Sort by the number: as strings 'checkpoint-10' sorts
            before 'checkpoint-2'. Tied weights: lm_head.weight is tied to transformer.wte.weight
            and is NOT stored; model.safetensors holds transformer.wte.weight only (16 tensors, no
            'lm_head.'); from_pretrained re-ties it. No 'model.' prefix (GPT2 keys start with
            'transformer.'). optimizer.pt / scheduler.pt load with weights_only=True;
            rng_state.pth (numpy _reconstruct) and training_args.bin (TrainingArguments) do not.
            Default LR schedule is linear decay to 0 at max_steps. Default output form == native
            form (a folder).
        """),
    )


def build_hf_trainer_sharded(
    tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0
) -> FrameworkRun:
    """Like :func:`build_hf_trainer`, but each checkpoint's weights are sharded safetensors.

    The Trainer never shards a model this small, so a ``TrainerCallback.on_save`` deletes the
    Trainer's ``model.safetensors`` and calls ``model.save_pretrained(ckpt, max_shard_size="8KB")``
    in the same folder; everything else in the folder (trainer_state.json, optimizer.pt, ...) is
    the Trainer's own output."""
    from transformers import TrainerCallback

    callback = type("ShardOnSave", (_ShardOnSave, TrainerCallback), {})("8KB")
    root = Path(tmp_path) / "hf_trainer_sharded"
    _train_gpt2(root, n_checkpoints=n_checkpoints, seed=seed, callbacks=[callback])
    names = _listed(root, r"checkpoint-(\d+)")
    if len(names) < n_checkpoints:
        raise AssertionError(f"Trainer wrote {names}")
    return FrameworkRun(
        framework="hf-trainer-sharded",
        root=root,
        names=names,
        steps=_trainer_steps(root, names),
        weights=[_hf_read_weights(root / n) for n in names],
        skipped=_trainer_skipped(root, names),
        load_back=_hf_load_back,
        load_back_native=_hf_load_back,
        notes=_text("""
            Trainer folders checkpoint-<global_step>/ whose weights were re-written by
            save_pretrained(max_shard_size='8KB') from an on_save callback:
            model-00001-of-00003.safetensors .. model-00003-of-00003.safetensors +
            model.safetensors.index.json ({'metadata': {'total_parameters', 'total_size'},
            'weight_map': {tensor: shard file}}); no model.safetensors. Same 16 tensor names as
            the unsharded run (tied lm_head not stored). Surprise: save_pretrained with shards
            leaves an existing single model.safetensors in place, so the callback deletes it
            first. Step = folder number = trainer_state.json 'global_step'.
        """),
    )


# --------------------------------------------------------------------------------------------
# 2: PEFT LoRA trained with the transformers Trainer


def _peft_base(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _peft_loader(seed: int):
    def load_back(path: Path) -> StateDict:
        """``PeftModel.from_pretrained(base, dir)``; every stored adapter key must be loaded."""
        from peft import PeftModel, get_peft_model_state_dict

        path = Path(path)
        _one_thread()
        base = _peft_base(seed)
        with _quiet(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, str(path))
        missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
        if missing:
            raise AssertionError(f"PeftModel.from_pretrained({path}): {missing}")
        stored = _safetensors_names(path / "adapter_model.safetensors")
        sd = get_peft_model_state_dict(model)
        if set(sd) != set(stored):
            raise AssertionError(
                f"adapter keys differ: only in file {sorted(set(stored) - set(sd))}, "
                f"only in model {sorted(set(sd) - set(stored))}"
            )
        return {k: sd[k].detach().clone() for k in stored}

    return load_back


def build_peft_trainer(tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0) -> FrameworkRun:
    """PEFT LoRA (r=2 on q/k/v/o_proj) on a tiny LlamaForCausalLM, trained with ``Trainer``."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    _one_thread()
    root = Path(tmp_path) / "peft_trainer"
    base = _peft_base(seed)
    lora = LoraConfig(
        r=2,
        lora_alpha=4,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, lora)
    args = _trainer_args(root, save_steps=2, n_checkpoints=n_checkpoints, seed=seed, lr=2e-2)
    with _quiet():
        Trainer(model=model, args=args, train_dataset=_CountingLM(seed=seed)).train()
    names = _listed(root, r"checkpoint-(\d+)")
    if len(names) < n_checkpoints:
        raise AssertionError(f"Trainer wrote {names}")
    return FrameworkRun(
        framework="peft-trainer",
        root=root,
        names=names,
        steps=_trainer_steps(root, names),
        weights=[load_file(str(root / n / "adapter_model.safetensors")) for n in names],
        skipped=_trainer_skipped(root, names),
        load_back=_peft_loader(seed),
        load_back_native=_peft_loader(seed),
        notes=_text("""
            root/checkpoint-<global_step>/ with adapter_model.safetensors, adapter_config.json,
            README.md (model card), trainer_state.json, optimizer.pt, scheduler.pt, rng_state.pth,
            training_args.bin; no config.json and no base weights. adapter_model.safetensors keys:
            'base_model.model.<base module path>.lora_A.weight' / '.lora_B.weight', e.g.
            'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' [2, 16] and
            '...q_proj.lora_B.weight' [16, 2] (adapter name 'default' is NOT in the key; 8
            tensors). lora_B starts at zero, so early checkpoints have small B.
            adapter_config.json has base_model_name_or_path=null (base built from config in code,
            seed-determined). Step = folder number = trainer_state.json 'global_step'.
        """),
    )


# --------------------------------------------------------------------------------------------
# 3 and 4: accelerate save_state with automatic checkpoint naming


class TinyRegressor(nn.Module):
    """A small MLP with a LayerNorm, used by the accelerate runs."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _accelerate_objects(seed: int):
    torch.manual_seed(seed)
    model = TinyRegressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.8)
    return model, opt, sched


def _reset_accelerate_state() -> None:
    """Forget the process-wide accelerate singletons, so a fresh Accelerator can be made."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _accelerate_read_weights(path: Path) -> StateDict:
    sf = path / "model.safetensors"
    if sf.exists():
        return load_file(str(sf))
    return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _accelerate_load_back(path: Path) -> StateDict:
    """``model.load_state_dict(<folder>/model.safetensors, strict=True)``; falls back to
    ``pytorch_model.bin`` when there is no model.safetensors (accelerate's own precedence)."""
    _one_thread()
    model = TinyRegressor()
    model.load_state_dict(_accelerate_read_weights(Path(path)), strict=True)
    return _clone(model.state_dict())


def _accelerate_load_back_native(path: Path) -> StateDict:
    """A fresh Accelerator, the same model/optimizer/scheduler prepared, then load_state(path)."""
    from accelerate import Accelerator

    _one_thread()
    _reset_accelerate_state()
    # other initial values than the run's, so that only a real load can produce the expected weights
    model, opt, sched = _accelerate_objects(seed=12345)
    with _quiet():
        acc = Accelerator(cpu=True)
        model, opt, sched = acc.prepare(model, opt, sched)
        acc.load_state(str(path))
    out = _clone(acc.unwrap_model(model).state_dict())
    _reset_accelerate_state()
    return out


def _build_accelerate(tmp_path: Path, n_checkpoints: int, seed: int, safe: bool) -> FrameworkRun:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    _one_thread()
    steps_per_save = 3
    project = Path(tmp_path) / ("accelerate" if safe else "accelerate_bin")
    _reset_accelerate_state()
    set_seed(seed)
    model, opt, sched = _accelerate_objects(seed)
    x, y = _regression_data(seed)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    with _quiet():
        acc = Accelerator(
            cpu=True,
            project_config=ProjectConfiguration(
                project_dir=str(project), automatic_checkpoint_naming=True
            ),
        )
        model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
        batches = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())
        for _ in range(n_checkpoints):
            for _ in range(steps_per_save):
                xb, yb = next(batches)
                with acc.accumulate(model):
                    loss = nn.functional.mse_loss(model(xb), yb)
                    acc.backward(loss)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
            acc.save_state(safe_serialization=safe)
    _reset_accelerate_state()

    holder = project / "checkpoints"
    names = _listed(holder, r"checkpoint_(\d+)")
    if len(names) < n_checkpoints:
        raise AssertionError(f"accelerate wrote {names}")
    steps = []
    for n in names:  # the optimizer step is only on disk as the scheduler's step count
        sched_state = torch.load(
            holder / n / "scheduler.bin", map_location="cpu", weights_only=True
        )
        steps.append(int(sched_state["last_epoch"]))
    expected = [steps_per_save * (_index_of(n, r"checkpoint_(\d+)") + 1) for n in names]
    if steps != expected:
        raise AssertionError(f"scheduler steps {steps}, expected {expected}")
    weights_file = "model.safetensors" if safe else "pytorch_model.bin"
    side = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"]
    return FrameworkRun(
        framework="accelerate" if safe else "accelerate-bin",
        root=project,
        names=names,
        steps=steps,
        weights=[_accelerate_read_weights(holder / n) for n in names],
        skipped=[f"checkpoints/{n}/{f}" for n in names for f in side if (holder / n / f).exists()],
        load_back=_accelerate_load_back,
        load_back_native=_accelerate_load_back_native,
        notes=_text(f"""
            root = the ProjectConfiguration project_dir; checkpoints are
            root/checkpoints/checkpoint_<i>/ (names are relative to root/checkpoints; passing
            root/checkpoints directly is equally sensible). Each holds {weights_file},
            optimizer.bin, scheduler.bin, random_states_0.pkl. i is the save counter (0, 1, 2,
            ...), NOT the optimizer step: {steps_per_save} optimizer steps per save, so
            checkpoint_i is step {steps_per_save}*(i+1); `steps` holds the optimizer step, which
            is on disk only as scheduler.bin 'last_epoch' (scheduler stepped once per optimizer
            step). random_states_0.pkl 'step' is accelerate's accumulation counter, which resets
            at each end of the dataloader: not the training step. Tensor names are the bare
            module's state_dict names (fc1.weight, norm.bias, ...; no 'module.' prefix on one CPU
            process). optimizer.bin and scheduler.bin load with weights_only=True;
            random_states_0.pkl does not (numpy _reconstruct). accelerate's load_state prefers
            model.safetensors over pytorch_model.bin when both exist, so a rebuilt folder with
            model.safetensors in place of pytorch_model.bin loads through load_state too.
        """),
    )


def build_accelerate(tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0) -> FrameworkRun:
    """accelerate ``save_state()`` with automatic checkpoint naming (safetensors weights)."""
    return _build_accelerate(tmp_path, n_checkpoints, seed, safe=True)


def build_accelerate_bin(tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0) -> FrameworkRun:
    """The same with ``save_state(safe_serialization=False)``: ``pytorch_model.bin``."""
    return _build_accelerate(tmp_path, n_checkpoints, seed, safe=False)


# --------------------------------------------------------------------------------------------
# 5: Lightning with ModelCheckpoint

_LIGHTNING_HPARAMS = {"d_in": 8, "hidden": 16, "d_out": 4, "lr": 0.05}
_LIGHTNING_NAME = r"epoch=(\d+)-step=(\d+)-val_loss=([-0-9.]+|nan|inf)\.ckpt"


def _lightning_step(name: str) -> int:
    m = re.fullmatch(_LIGHTNING_NAME, name)
    if m is None:
        raise ValueError(name)
    return int(m.group(2))


def _lightning_load_back_native(path: Path) -> StateDict:
    from .lightning_modules import TinyLitRegressor

    _one_thread()
    with _quiet():
        module = TinyLitRegressor.load_from_checkpoint(str(path), map_location="cpu", strict=True)
    return _clone(module.state_dict())


def _lightning_load_back(path: Path) -> StateDict:
    from .lightning_modules import TinyLitRegressor

    _one_thread()
    module = TinyLitRegressor(**_LIGHTNING_HPARAMS)
    module.load_state_dict(load_file(str(path)), strict=True)
    return _clone(module.state_dict())


def build_lightning(tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0) -> FrameworkRun:
    """``lightning.Trainer(max_epochs=n)`` + ``ModelCheckpoint(save_top_k=-1, save_last=True)``."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .lightning_modules import TinyLitRegressor

    _one_thread()
    root = Path(tmp_path) / "lightning"
    with _quiet():
        L.seed_everything(seed, verbose=False)
        x, y = _regression_data(seed, n=56)
        train = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x[:40], y[:40]),
            batch_size=8,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        val = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x[40:], y[40:]), batch_size=8
        )
        checkpoint = ModelCheckpoint(
            dirpath=str(root),
            filename="{epoch}-{step}-{val_loss:.2f}",
            save_top_k=-1,
            every_n_epochs=1,
            save_last=True,
        )
        trainer = L.Trainer(
            max_epochs=n_checkpoints,
            accelerator="cpu",
            devices=1,
            callbacks=[checkpoint],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
            log_every_n_steps=1,
            default_root_dir=str(root),
        )
        trainer.fit(TinyLitRegressor(**_LIGHTNING_HPARAMS), train, val)
    names = sorted(
        (p.name for p in root.glob("*.ckpt") if re.fullmatch(_LIGHTNING_NAME, p.name)),
        key=_lightning_step,
    )
    if len(names) < n_checkpoints:
        raise AssertionError(f"Lightning wrote {sorted(p.name for p in root.iterdir())}")
    weights = []
    steps = []
    for n in names:
        ckpt = torch.load(root / n, map_location="cpu", weights_only=True)
        if ckpt["global_step"] != _lightning_step(n):
            raise AssertionError(f"{n}: global_step {ckpt['global_step']}")
        steps.append(int(ckpt["global_step"]))
        weights.append(ckpt["state_dict"])
    return FrameworkRun(
        framework="lightning",
        root=root,
        names=names,
        steps=steps,
        weights=weights,
        skipped=["last.ckpt"],
        load_back=_lightning_load_back,
        load_back_native=_lightning_load_back_native,
        notes=_text("""
            root/epoch=<e>-step=<global_step>-val_loss=<x.xx>.ckpt per epoch + last.ckpt (a second
            full save of the final state, a regular file, not a link). 5 optimizer steps per
            epoch. Step = 'step=' in the name = ckpt['global_step']; ckpt['epoch'] = e. Sort by
            the parsed step (as strings 'epoch=10-...' sorts before 'epoch=2-...'). Top-level
            keys: epoch, global_step, pytorch-lightning_version, state_dict, loops, callbacks,
            optimizer_states, lr_schedulers, hparams_name ('kwargs'), hyper_parameters (a plain
            dict {'d_in': 8, 'hidden': 16, 'd_out': 4, 'lr': 0.05}). torch.load(weights_only=True)
            SUCCEEDS on these .ckpt files with lightning 2.6.6 / torch 2.13 (hparams are plain
            Python values; the callbacks entry holds strings, None and a tensor(inf)). Tensor
            names are the LightningModule's state_dict names: 'net.0.weight', 'net.0.bias',
            'net.2.weight', 'net.2.bias' (the attribute path, no 'model.' prefix unless the user's
            module has one).
        """),
    )


# --------------------------------------------------------------------------------------------
# 6: a faithful writer of timm's CheckpointSaver output (NOT timm itself; timm is not installed)


class TinyConvNet(nn.Module):
    """A timm-like tiny classifier with a BatchNorm (so the state dict has int64 buffers)."""

    def __init__(self, num_classes: int = 4, width: int = 6):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv_stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class _EmaV3Like:
    """EMA of every state-dict entry like timm's ModelEmaV3: floats are lerped, others copied;
    the decay is 0 for the first update (a copy) and ``decay`` afterwards."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.module = copy.deepcopy(model).eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = 0.0 if step <= 1 else self.decay
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.lerp_(m, 1.0 - decay)
            else:
                e.copy_(m)


class _TimmStyleSaver:
    """Writes what timm's ``CheckpointSaver.save_checkpoint`` writes (model, optimizer, args, EMA).

    Each save goes to ``tmp.pth.tar``, is moved over ``last.pth.tar``, and ``last.pth.tar`` is
    hard-linked to ``checkpoint-<epoch>.pth.tar`` and, when the metric improves, to
    ``model_best.pth.tar``.  Only the keep-everything case is reproduced (``max_history`` is at
    least the number of epochs), so no file is ever trimmed."""

    extension = ".pth.tar"

    def __init__(self, model, optimizer, args, model_ema, checkpoint_dir: Path, decreasing: bool):
        self.model, self.optimizer, self.args, self.model_ema = model, optimizer, args, model_ema
        self.checkpoint_dir = Path(checkpoint_dir)
        self.decreasing = decreasing
        self.best_metric = None
        self.saved = 0

    def _link(self, src: Path, dst: Path) -> None:
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    def save_checkpoint(self, epoch: int, metric: float) -> None:
        if self.saved >= self.args.checkpoint_hist:
            raise AssertionError("history trimming is not reproduced; raise checkpoint_hist")
        state = {
            "epoch": epoch,
            "arch": self.args.model,
            "optimizer": self.optimizer.state_dict(),
            "version": 2,
            "args": self.args,
            "state_dict": self.model.state_dict(),
            "state_dict_ema": self.model_ema.module.state_dict(),
            "metric": metric,
        }
        tmp = self.checkpoint_dir / f"tmp{self.extension}"
        last = self.checkpoint_dir / f"last{self.extension}"
        torch.save(state, tmp)
        os.replace(tmp, last)
        self._link(last, self.checkpoint_dir / f"checkpoint-{epoch}{self.extension}")
        self.saved += 1
        better = self.best_metric is None or (
            metric < self.best_metric if self.decreasing else metric > self.best_metric
        )
        if better:
            self.best_metric = metric
            self._link(last, self.checkpoint_dir / f"model_best{self.extension}")


def _torch_load_namespace(path: Path):
    """``torch.load(weights_only=True)`` with ``argparse.Namespace`` allowed (timm pickles args)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _timm_load_back_native(path: Path) -> StateDict:
    """What timm's resume does: torch.load, then
    ``model.load_state_dict(ckpt['state_dict'], strict=True)``."""
    _one_thread()
    model = TinyConvNet()
    model.load_state_dict(_torch_load_namespace(Path(path))["state_dict"], strict=True)
    return _clone(model.state_dict())


def _timm_load_back(path: Path) -> StateDict:
    _one_thread()
    model = TinyConvNet()
    model.load_state_dict(load_file(str(path)), strict=True)
    return _clone(model.state_dict())


def build_timm_style(tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0) -> FrameworkRun:
    """A timm-train.py-like run (SGD+nesterov, per-step EMA, per-epoch eval) saved the way timm's
    CheckpointSaver saves it. Faithful writer, not timm itself."""
    _one_thread()
    root = Path(tmp_path) / "timm_style" / "output" / "train" / "tinynet-run"
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed + 7)
    images = torch.randn(80, 3, 6, 6, generator=g)
    proj = torch.randn(3, 4, generator=g)
    labels = (images.mean(dim=(2, 3)) @ proj).argmax(dim=1)
    x_train, y_train, x_val, y_val = images[:64], labels[:64], images[64:], labels[64:]

    args = argparse.Namespace(
        model="tinynet",
        num_classes=4,
        input_size=[3, 6, 6],
        batch_size=16,
        epochs=n_checkpoints,
        opt="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=2e-5,
        sched="cosine",
        model_ema=True,
        model_ema_decay=0.9,
        model_ema_warmup=False,
        eval_metric="top1",
        checkpoint_hist=max(10, n_checkpoints),
        seed=seed,
        output=str(root.parent.parent),
        experiment=root.name,
        amp=False,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
    )
    torch.manual_seed(seed)
    model = TinyConvNet(num_classes=4)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        nesterov=True,
        weight_decay=args.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    ema = _EmaV3Like(model, decay=args.model_ema_decay)
    saver = _TimmStyleSaver(model, optimizer, args, ema, root, decreasing=False)
    try:
        import yaml

        (root / "args.yaml").write_text(yaml.safe_dump(vars(args), default_flow_style=False))
    except ImportError:  # pragma: no cover
        pass
    summary = ["epoch,lr,train_loss,eval_loss,eval_top1"]
    order = torch.Generator().manual_seed(seed)
    num_updates = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=order)
        losses = []
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            ema.update(model, step=num_updates)
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            eval_loss = nn.functional.cross_entropy(logits, y_val).item()
            top1 = 100.0 * (logits.argmax(dim=1) == y_val).float().mean().item()
        lr = optimizer.param_groups[0]["lr"]
        summary.append(f"{epoch},{lr},{sum(losses) / len(losses)},{eval_loss},{top1}")
        (root / "summary.csv").write_text("\n".join(summary) + "\n")
        saver.save_checkpoint(epoch, metric=top1)
        scheduler.step()

    names = _listed(root, r"checkpoint-(\d+)\.pth\.tar")
    if len(names) < n_checkpoints:
        raise AssertionError(f"wrote {names}")
    weights, ema_weights, steps = [], [], []
    for n in names:
        ckpt = _torch_load_namespace(root / n)
        steps.append(int(ckpt["epoch"]))
        weights.append(ckpt["state_dict"])
        ema_weights.append(ckpt["state_dict_ema"])
    return FrameworkRun(
        framework="timm-style",
        root=root,
        names=names,
        steps=steps,
        weights=weights,
        alternatives={"state_dict_ema": ema_weights},
        skipped=["last.pth.tar", "model_best.pth.tar"],
        load_back=_timm_load_back,
        load_back_native=_timm_load_back_native,
        notes=_text("""
            Faithful re-implementation of timm CheckpointSaver output (timm not installed). root =
            output/train/<experiment>/ holding checkpoint-<epoch>.pth.tar (epoch from 0),
            last.pth.tar (hard link to the newest checkpoint), model_best.pth.tar (hard link to
            the best-metric one), args.yaml, summary.csv. Each .pth.tar is a torch.save dict:
            epoch (int), arch (str), optimizer (SGD state_dict), version (2), args
            (argparse.Namespace: needs torch.serialization.safe_globals([argparse.Namespace]) for
            weights_only=True), state_dict, state_dict_ema, metric (float, eval top1). Step = the
            epoch (file name = ckpt['epoch']); 4 optimizer steps per epoch, so the optimizer step
            is 4*(epoch+1), recorded nowhere. state_dict has int64 bn1.num_batches_tracked; the
            EMA (updated every step, decay 0.9) copies it. Keys are bare (conv_stem.weight,
            bn1.running_mean, head.bias, ...). Beware: timm's own
            load_checkpoint/load_state_dict(use_ema=True) PREFERS state_dict_ema when present;
            resume_checkpoint uses state_dict. Both strip a leading 'module.' (clean_state_dict).
        """),
    )
