"""The shared training loop (seqvision.train) on toy models that follow the model contract. CPU, tiny."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from seqvision import checkpoint, distributed, io, runtime, train
from seqvision.config import ConfigError, TrainConfig
from seqvision.datasets import make_loader
from seqvision.train import TIMING_KEYS

try:  # the real typed batches when the datasets module is there; same fields otherwise
    from seqvision.datasets import CaptionBatch, ClipBatch
except ImportError:  # pragma: no cover

    class ClipBatch(NamedTuple):  # type: ignore[no-redef]
        ids: list[str]
        visual: Tensor
        lengths: Tensor
        labels: Tensor

    class CaptionBatch(NamedTuple):  # type: ignore[no-redef]
        ids: list[str]
        visual: Tensor
        lengths: Tensor
        tokens: Tensor
        token_lengths: Tensor


PAD, BOS, EOS = 0, 1, 2
FEATURES, CLASSES, VOCAB, FRAMES = 4, 3, 9, 5


# --------------------------------------------------------------------------------------------------------
# Toy models following docs/design.md "Model contract"


@dataclass(frozen=True)
class ToyConfig:
    feature_dim: int = FEATURES
    hidden_size: int = 8
    num_classes: int = CLASSES
    vocab_size: int = VOCAB
    dropout: float = 0.1


class ToyActivity(nn.Module):
    """GRU over (B, T, D) + linear; dropout so that resuming must restore the torch RNG."""

    task, family = "activity", "toy-gru"

    def __init__(self, config: ToyConfig = ToyConfig()) -> None:
        super().__init__()
        self.config = config
        self.gru = nn.GRU(config.feature_dim, config.hidden_size, batch_first=True)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.num_classes)

    def forward(self, visual: Tensor, lengths: Tensor, labels: Tensor | None = None, *,
                label_smoothing: float = 0.0) -> tuple[Tensor, Tensor | None]:
        out, _ = self.gru(visual)  # (B, T, H)
        last = out[torch.arange(len(lengths)), lengths - 1]  # (B, H)
        logits = self.head(self.drop(last))  # (B, C)
        loss = None if labels is None else F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        return logits, loss


class ToyCaptioner(nn.Module):
    """Mean-pooled visual -> initial GRU state; teacher-forced on tokens[:, :-1] against tokens[:, 1:]."""

    task, family = "video_captioning", "toy-gru"

    def __init__(self, config: ToyConfig = ToyConfig()) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.feature_dim, config.hidden_size)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.gru = nn.GRU(config.hidden_size, config.hidden_size, batch_first=True)
        self.out = nn.Linear(config.hidden_size, config.vocab_size)

    def encode(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor]:
        mask = (torch.arange(visual.size(1), device=visual.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        return (torch.tanh(self.proj((visual * mask).sum(1) / lengths[:, None])),)  # (B, H)

    def init_state(self, memory: tuple[Tensor]) -> tuple[Tensor]:
        return (memory[0].unsqueeze(1),)  # (B, 1, H)

    def step(self, prev: Tensor, state: tuple[Tensor], memory: tuple[Tensor]) -> tuple[Tensor, tuple[Tensor]]:
        out, h = self.gru(self.embed(prev).unsqueeze(1), state[0].transpose(0, 1).contiguous())
        return self.out(out[:, 0]), (h.transpose(0, 1),)

    def forward(self, visual: Tensor, lengths: Tensor, tokens: Tensor | None = None,
                token_lengths: Tensor | None = None, *, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
        h0 = self.init_state(self.encode(visual, lengths))[0].transpose(0, 1).contiguous()  # (1, B, H)
        out, _ = self.gru(self.embed(tokens[:, :-1]), h0)  # (B, L-1, H)
        logits = self.out(out)  # (B, L-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                               ignore_index=PAD, label_smoothing=label_smoothing)
        return logits, loss


# --------------------------------------------------------------------------------------------------------
# Tiny synthetic data


def clip_items(n: int, seed: int) -> list[tuple[str, Tensor, int, int]]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = int(torch.randint(2, FRAMES + 1, (1,), generator=g))
        visual = torch.randn(FRAMES, FEATURES, generator=g)
        label = int(visual[:length, :CLASSES].mean(0).argmax())  # learnable from the real frames
        items.append((f"clip{i}", visual, length, label))
    return items


def collate_clips(items: list[tuple[str, Tensor, int, int]]) -> ClipBatch:
    return ClipBatch(
        ids=[i for i, *_ in items],
        visual=torch.stack([v for _, v, _, _ in items]),
        lengths=torch.tensor([n for *_, n, _ in items]),
        labels=torch.tensor([y for *_, y in items]),
    )


def caption_items(n: int, seed: int) -> list[tuple[str, Tensor, int, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        words = torch.randint(3, VOCAB, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
        items.append((f"v{i}", torch.randn(FRAMES, FEATURES, generator=g), FRAMES,
                      torch.cat([torch.tensor([BOS]), words, torch.tensor([EOS])])))
    return items


def collate_captions(items: list[tuple[str, Tensor, int, Tensor]]) -> CaptionBatch:
    longest = max(len(t) for *_, t in items)
    tokens = torch.full((len(items), longest), PAD, dtype=torch.int64)
    for row, (*_, t) in enumerate(items):
        tokens[row, : len(t)] = t
    return CaptionBatch(
        ids=[i for i, *_ in items],
        visual=torch.stack([v for _, v, _, _ in items]),
        lengths=torch.tensor([n for _, _, n, _ in items]),
        tokens=tokens,
        token_lengths=torch.tensor([len(t) for *_, t in items]),
    )


class ToyItems(torch.utils.data.Dataset):
    """A list of items as a dataset of ``datasets.make_loader``'s kind: ``(index, epoch)`` keys, its own collate."""

    def __init__(self, items: list, collate) -> None:
        self.items, self.collate = items, collate

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        return self.items[key[0] if isinstance(key, tuple) else key]


def toy_loader(items: list, collate, *, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """``datasets.make_loader``, the pipeline's one loader, over toy items."""
    dataset = ToyItems(items, collate)
    return make_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]


class EpochKeyedSampler(torch.utils.data.Sampler):
    """Shuffles from (seed, epoch) like datasets.EpochSampler; set_epoch() positions it."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        self.epoch += 1
        return iter(order.tolist())


def loaders(kind: str = "clips", *, seed: int = 0, order: str = "generator") -> tuple[DataLoader, DataLoader]:
    items, collate = (clip_items, collate_clips) if kind == "clips" else (caption_items, collate_captions)
    if order == "generator":
        tr = toy_loader(items(24, 1), collate, batch_size=8, shuffle=True, seed=seed)
    elif order == "global-rng":  # a plain DataLoader: shuffling then draws from the global torch RNG
        tr = DataLoader(items(24, 1), batch_size=8, shuffle=True, collate_fn=collate)
    else:  # epoch-keyed sampler with a persistent worker, which draws its base seed only once
        tr = DataLoader(items(24, 1), batch_size=8, sampler=EpochKeyedSampler(24, seed), collate_fn=collate,
                        num_workers=1, persistent_workers=True)
    va = toy_loader(items(8, 2), collate, batch_size=8, shuffle=False)
    return tr, va


LR = 0.01  # fit's peak learning rate (a knob of each model family in params.yaml, not of train:)


def config(**overrides) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, warmup_fraction=0.2, device="cpu", num_workers=0,
                deterministic=True, patience=0, log_every=2, seed=0)
    return TrainConfig(**{**base, **overrides})


def fit(*args, lr: float = LR, **kwargs) -> train.FitResult:
    return train.fit(*args, lr=lr, **kwargs)


def fresh(cls: type[nn.Module] = ToyActivity, seed: int = 0) -> nn.Module:
    runtime.seed_everything(seed)
    return cls()


def same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DETERMINISTIC_KEYS = ("epoch", "step", "train_loss", "val_loss", "val_metric", "lr", "grad_norm")


# --------------------------------------------------------------------------------------------------------
# Schedule


def test_warmup_cosine_values():
    f = lambda s: train.warmup_cosine(s, warmup_steps=10, total_steps=111, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)  # warmup: (step + 1) / warmup_steps
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)  # peak, then cosine
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(110) == pytest.approx(0.1)  # last step ends exactly at min_lr_ratio
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_scheduler_drives_optimizer_lr_per_step():
    cfg = config(warmup_fraction=0.25, min_lr_ratio=0.0)
    model = nn.Linear(2, 1)
    opt = train.make_optimizer(model, cfg, lr=0.5, device=torch.device("cpu"))
    sched = train.make_scheduler(opt, cfg, total_steps=8)  # 2 warmup steps, 6 cosine steps
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.25, 0.5] + [0.5 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(6)]
    assert seen == pytest.approx(expected)


# --------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("order", ["generator", "global-rng", "epoch-sampler"])
def test_resume_equals_uninterrupted_run(tmp_path, order):
    cfg = config(epochs=2)

    tr, va = loaders(order=order)
    straight = fresh()
    result = fit(straight, tr, va, config=cfg, out_dir=tmp_path / "a", metric=train.ACCURACY)

    calls = []

    def crash_in_epoch_two(model, loader, device):  # dies after epoch 2 trained, before its checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train.accuracy(model, loader, device)

    tr, va = loaders(order=order)
    interrupted = fresh()
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, tr, va, config=cfg, out_dir=tmp_path / "b",
                  metric=train.ValidationMetric("accuracy", crash_in_epoch_two, True))
    assert checkpoint.load(tmp_path / "b" / "last.pt")["epoch"] == 1

    tr, va = loaders(order=order)  # new process: new loaders, a differently initialised model
    resumed_model = fresh(seed=123)
    resumed = fit(resumed_model, tr, va, config=cfg, out_dir=tmp_path / "b", metric=train.ACCURACY,
                        resume=True)

    assert same_weights(straight.state_dict(), resumed_model.state_dict())
    assert [{k: e[k] for k in DETERMINISTIC_KEYS} for e in result.history] == [
        {k: e[k] for k in DETERMINISTIC_KEYS} for e in resumed.history
    ]
    saved = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [e["epoch"] for e in saved] == [1, 2]
    # ... and the same bytes, which is what DVC hashes (the resumed history comes back from last.pt as new
    # objects: checkpoint.to_bytes pickles values, not object identities)
    for name in ("best.pt", "last.pt", "history.json"):
        assert io.file_digest(tmp_path / "a" / name) == io.file_digest(tmp_path / "b" / name), (order, name)


def test_resume_restores_data_order_not_a_fresh_shuffle(tmp_path):
    # Guard for the test above: each epoch has its own order, a function of (seed, epoch) that fit positions
    # when it resumes (a fresh loader would otherwise replay epoch 1's order).
    tr, _ = loaders()
    first = [b.ids for b in tr]
    second = [b.ids for b in tr]
    assert first != second
    fresh_loader, _ = loaders()
    train._set_sampler_epoch(fresh_loader, 2)  # fit counts epochs from 1
    assert [b.ids for b in fresh_loader] == second


def test_resuming_a_finished_run_still_writes_its_history(tmp_path):
    # DVC deletes a stage's non-persistent outputs (history.json) before rerunning it; the checkpoints persist.
    tr, va = loaders()
    done = fit(fresh(), tr, va, config=config(epochs=2), out_dir=tmp_path)
    (tmp_path / "history.json").unlink()
    again = fit(fresh(), tr, va, config=config(epochs=2), out_dir=tmp_path, resume=True)
    assert again.history == done.history  # the times too: read back from runinfo.json
    on_disk = json.loads((tmp_path / "history.json").read_text())
    assert on_disk == [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in done.history]
    assert len(again.history) == 2


def test_resume_refuses_changed_maths(tmp_path):
    tr, va = loaders()
    fit(fresh(), tr, va, config=config(epochs=1), out_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"train\.weight_decay"):
        fit(fresh(), tr, va, config=config(epochs=1, weight_decay=0.5), out_dir=tmp_path, resume=True)
    with pytest.raises(ConfigError, match="learning rate was 0.01, now 0.5"):
        fit(fresh(), tr, va, config=config(epochs=1), lr=0.5, out_dir=tmp_path, resume=True)


# --------------------------------------------------------------------------------------------------------
# Failure handling


class NaNAfter(ToyActivity):
    """Its training loss turns NaN on the ``bad_call``-th training forward."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.bad_call, self.calls = bad_call, 0

    def forward(self, visual, lengths, labels=None, **kwargs):
        logits, loss = super().forward(visual, lengths, labels, **kwargs)
        if self.training:
            self.calls += 1
            if self.calls == self.bad_call:
                loss = loss * float("nan")
        return logits, loss


def test_nan_loss_names_the_step_and_keeps_last_good_checkpoint(tmp_path):
    tr, va = loaders()  # 3 steps per epoch; step 5 = epoch 2, step 2
    runtime.seed_everything(0)
    model = NaNAfter(bad_call=5)
    with pytest.raises(train.NonFiniteLossError) as info:
        fit(model, tr, va, config=config(epochs=3, log_every=100), out_dir=tmp_path)
    message = str(info.value)
    assert "epoch 2, step 2/3 (global step 5)" in message
    assert "last.pt" in message and "nan" in message.lower()
    kept = checkpoint.load(tmp_path / "last.pt")
    assert kept["epoch"] == 1 and kept["step"] == 3
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
    assert [e["epoch"] for e in json.loads((tmp_path / "history.json").read_text())] == [1]


def test_nan_in_first_epoch_says_no_checkpoint(tmp_path):
    tr, va = loaders()
    runtime.seed_everything(0)
    with pytest.raises(train.NonFiniteLossError, match="epoch 1, step 1/3.*no checkpoint"):
        fit(NaNAfter(bad_call=1), tr, va, config=config(), out_dir=tmp_path)
    assert not (tmp_path / "last.pt").exists()


# --------------------------------------------------------------------------------------------------------
# Gradient clipping


class Loud(ToyActivity):
    def forward(self, visual, lengths, labels=None, **kwargs):
        logits, loss = super().forward(visual, lengths, labels, **kwargs)
        return logits, loss * 1000.0  # large gradients


@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_clipping_bounds_the_gradient_norm(max_norm):
    cfg = config(clip_grad_norm=max_norm)
    model = fresh(Loud)
    tr, _ = loaders()
    opt = train.make_optimizer(model, cfg, lr=0.01, device=torch.device("cpu"))
    stats = train.train_one_epoch(model, tr, opt, None, device=torch.device("cpu"), config=cfg)
    # after the epoch, .grad holds the last step's gradients as the optimizer used them (after clipping)
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    assert stats.grad_norm > 1.0  # the unclipped norms really were large
    if max_norm:
        assert norm <= max_norm * (1 + 1e-5)
    else:
        assert norm > 1.0


# --------------------------------------------------------------------------------------------------------
# Scheduled sampling


def test_scheduled_sampling_with_p0_equals_teacher_forcing():
    tr, _ = loaders("captions")
    batch = next(iter(tr))
    teacher = fresh(ToyCaptioner)
    two_pass = fresh(ToyCaptioner)
    _, tf_loss = teacher(batch.visual, batch.lengths, tokens=batch.tokens, token_lengths=batch.token_lengths)
    ss_loss = train.scheduled_sampling_loss(two_pass, batch, prob=0.0)
    torch.testing.assert_close(ss_loss, tf_loss, rtol=0, atol=0)
    tf_loss.backward()
    ss_loss.backward()
    for a, b in zip(teacher.parameters(), two_pass.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    # and p > 0 really feeds the model's own guesses
    assert not torch.equal(train.scheduled_sampling_loss(two_pass, batch, prob=1.0), ss_loss)


def test_mix_tokens_only_touches_real_inputs_after_bos():
    tokens = torch.tensor([[BOS, 5, 6, 7, EOS, PAD], [BOS, 8, EOS, PAD, PAD, PAD]])
    lengths = torch.tensor([5, 3])
    predicted = torch.full((2, 5), 4)
    assert torch.equal(train.mix_tokens(tokens, predicted, lengths, prob=0.0), tokens)
    mixed = train.mix_tokens(tokens, predicted, lengths, prob=1.0)
    assert mixed.tolist() == [[BOS, 4, 4, 4, EOS, PAD], [BOS, 4, EOS, PAD, PAD, PAD]]


def test_scheduled_sampling_ramps_linearly():
    probs = [train.scheduled_sampling_prob(s, total_steps=5, max_prob=0.4) for s in range(5)]
    assert probs == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_fit_trains_a_captioner_with_scheduled_sampling_and_label_smoothing(tmp_path):
    tr, va = loaders("captions")
    result = fit(fresh(ToyCaptioner), tr, va, lr=0.05, config=config(epochs=3, scheduled_sampling=0.5,
                                                                   label_smoothing=0.1), out_dir=tmp_path)
    losses = [e["val_loss"] for e in result.history]
    assert losses[-1] < losses[0]
    assert result.history[-1]["scheduled_sampling"] == pytest.approx(0.5)
    assert result.metric == "loss" and result.best_metric == min(losses)


# --------------------------------------------------------------------------------------------------------
# Best checkpoint and early stopping


def scripted_validation(monkeypatch, losses):
    """Make fit's validation loss follow ``losses`` (the metric still comes from the ValidationMetric)."""
    losses = iter(losses)
    original = train._validate

    def validate(*args, **kwargs):
        _, value = original(*args, **kwargs)
        return next(losses), value

    monkeypatch.setattr(train, "_validate", validate)


def test_early_stopping_and_best_checkpoint_follow_the_metric(tmp_path, monkeypatch):
    scripted = iter([0.2, 0.5, 0.4, 0.3, 0.9, 0.9])
    scripted_validation(monkeypatch, [1.0, 0.9, 0.95, 0.97] * 3)  # the loss stops improving after epoch 2 too
    snapshots = {}

    def metric(model, loader, device):
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return next(scripted)

    tr, va = loaders()
    result = fit(fresh(), tr, va, config=config(epochs=6, patience=2), out_dir=tmp_path,
                       metric=train.ValidationMetric("score", metric, higher_is_better=True))
    assert result.stopped_early and [e["epoch"] for e in result.history] == [1, 2, 3, 4]
    assert (result.best_epoch, result.best_metric) == (2, 0.5)
    best = checkpoint.load(result.best_checkpoint)
    assert best["epoch"] == 2 and same_weights(best["model"], snapshots[2])
    assert not same_weights(best["model"], snapshots[4])
    last = checkpoint.load(result.last_checkpoint)
    assert last["epoch"] == 4 and last["stopped_early"]

    # resuming a stopped run does not train further
    again = fit(fresh(), tr, va, config=config(epochs=6, patience=2), out_dir=tmp_path, resume=True,
                      metric=train.ValidationMetric("score", metric, higher_is_better=True))
    assert len(again.history) == 4 and next(scripted) == 0.9  # metric not called again


def test_a_falling_validation_loss_keeps_a_plateaued_metric_training(tmp_path, monkeypatch):
    # CIDEr-D can stall for epochs while the loss still falls (docs/tuning.md): patience waits for both.
    scripted_validation(monkeypatch, [1.0, 0.9, 0.8, 0.7, 0.6, 0.6, 0.6])
    tr, va = loaders()
    result = fit(fresh(), tr, va, config=config(epochs=7, patience=2), out_dir=tmp_path,
                 metric=train.ValidationMetric("score", lambda *a: 0.5, higher_is_better=True))
    assert [e["epoch"] for e in result.history] == [1, 2, 3, 4, 5, 6, 7] and not result.stopped_early
    assert result.best_epoch == 1 and result.epochs_since_best == 2  # converged just as the cap came


def test_lower_is_better_metric_picks_the_minimum(tmp_path):
    scripted = iter([0.5, 0.2, 0.4])
    tr, va = loaders()
    result = fit(fresh(), tr, va, config=config(epochs=3), out_dir=tmp_path,
                       metric=train.ValidationMetric("wer", lambda *a: next(scripted), higher_is_better=False))
    assert (result.best_epoch, result.best_metric) == (2, 0.2)
    assert checkpoint.load(tmp_path / "best.pt")["epoch"] == 2


# --------------------------------------------------------------------------------------------------------
# Checkpoint contents, history, learning, model keywords


def test_checkpoint_rebuilds_model_and_history_has_every_column(tmp_path):
    tr, va = loaders()
    model = fresh()
    spec = {"task": "activity", "family": "toy", "config": dataclasses.asdict(model.config)}
    fit(model, tr, va, config=config(epochs=1), out_dir=tmp_path, spec=spec, extra={"fingerprint": "f"})
    ckpt = checkpoint.load(tmp_path / "last.pt")  # verified; weights_only: plain data, no pickled classes
    assert ckpt["spec"] == spec and ckpt["fingerprint"] == "f"
    rebuilt = ToyActivity(ToyConfig(**ckpt["spec"]["config"]))
    rebuilt.load_state_dict(ckpt["model"])
    assert same_weights(rebuilt.state_dict(), model.state_dict())
    assert {"optimizer", "scheduler", "rng", "history", "train_config", "best_metric"} <= ckpt.keys()
    (entry,) = json.loads((tmp_path / "history.json").read_text())
    assert {"train_loss", "val_loss", "val_metric", "lr", "grad_norm"} <= entry.keys()
    # Measurements of the run live in runinfo.json only, never in a hashed output.
    assert not set(TIMING_KEYS) & (entry.keys() | ckpt["history"][0].keys())
    (timed,) = io.read_runinfo(tmp_path)["epochs"]
    assert timed["epoch"] == 1 and timed["samples_per_s"] > 0 and timed["peak_memory_mb"] > 0
    assert timed["epoch_time_s"] >= timed["train_time_s"] > 0


def test_the_same_fit_twice_writes_the_same_bytes(tmp_path):
    # DVC hashes the checkpoints and history.json: the same inputs must give the same hashes on every run (the
    # times that differ go to runinfo.json, which .dvcignore hides from DVC).
    tr, va = loaders()
    for name in ("a", "b"):
        fit(fresh(), tr, va, config=config(epochs=2), out_dir=tmp_path / name)
    for name in ("best.pt", "last.pt", "history.json"):
        assert io.file_digest(tmp_path / "a" / name) == io.file_digest(tmp_path / "b" / name), name
    assert io.read_runinfo(tmp_path / "a") != io.read_runinfo(tmp_path / "b")  # the wall-clock times differ


def test_activity_model_learns(tmp_path):
    tr, va = loaders()
    result = fit(fresh(), tr, va, lr=0.05, config=config(epochs=8), out_dir=tmp_path,
                       metric=train.ACCURACY)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_metric >= 0.6  # chance is 1/3


class NoSmoothing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(FEATURES, CLASSES)

    def forward(self, visual, lengths, labels=None):
        logits = self.head(visual.mean(1))
        return logits, None if labels is None else F.cross_entropy(logits, labels)


def test_model_keywords_are_checked():
    with pytest.raises(TypeError, match="label_smoothing"):
        train.training_kwargs(NoSmoothing(), config(label_smoothing=0.1))
    assert train.training_kwargs(NoSmoothing(), config()) == {}
    assert train.training_kwargs(ToyActivity(), config(label_smoothing=0.1)) == {"label_smoothing": 0.1}


def test_distributed_helpers_without_a_process_group():
    assert distributed.is_rank0() and distributed.world_size() == 1 and distributed.rank() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_fit_on_cuda_bf16_is_finite_repeatable_and_loads_on_cpu(tmp_path, compile):
    cfg = config(device="auto", compile=compile, epochs=2, scheduled_sampling=0.5)
    runs = []
    for name in ("a", "b"):
        tr, va = loaders("captions")
        model = fresh(ToyCaptioner)
        runs.append(fit(model, tr, va, config=cfg, out_dir=tmp_path / name))
        assert next(model.parameters()).device.type == "cuda"
    assert all(math.isfinite(e["val_loss"]) and e["peak_memory_mb"] > 0 for e in runs[0].history)
    assert [e["val_loss"] for e in runs[0].history] == [e["val_loss"] for e in runs[1].history]
    ckpt = checkpoint.load(tmp_path / "a" / "last.pt")
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
    ToyCaptioner().load_state_dict(ckpt["model"])


@pytest.mark.parametrize("compile_model", [False, True])
def test_configure_backends_switches_deterministic_kernels(compile_model):
    try:
        runtime.configure_backends(torch.device("cpu"), deterministic=True, compile_model=compile_model)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        runtime.configure_backends(torch.device("cpu"), deterministic=False, compile_model=compile_model)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
