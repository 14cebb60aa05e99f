"""The attention captioners' teacher forcing: packed (``RecurrentDecoder.forward``, only the rows still going at each
step) against the reference, every step of the padded batch through ``step`` (what ``forward`` did before), on one
CPU thread.

    python benchmarks/decoder.py [--tokens artifacts/tokens] [--params params.yaml] [--batches 8] [--repeats 5]
                                 [--docs docs/benchmarks.md]

For the recurrent families (rnn, lstm, gru) with attention on both captioning tasks, at the comparison's sizes
(``models.match_params`` of ``--params``, 128-d features, 16 grid cells or frames): ``--batches`` batches of
``train.batch_size`` captions drawn from ``--tokens``' training captions (the real length mix; without the folder,
uniform lengths in the default data's range), forward and backward of the loss, timed interleaved ``--repeats``
times after a warm-up; the median per batch is reported with the ratio reference / packed (> 1: packed is faster).
Both compute the same loss (``tests/test_models.py``). Printed as markdown; replaces the "## Captioning decoder"
section of ``--docs``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqvision import models
from seqvision.blocks import ModelDims, caption_loss
from seqvision.config import load_params
from seqvision.io import replace_markdown_section

HEADING = "## Captioning decoder"
FEATURE_DIM, CELLS = 128, 16
CORPUS = {"image_captioning": "image", "video_captioning": "video"}
DEFAULT_LENGTHS = {"image_captioning": (10, 30), "video_captioning": (8, 23)}  # tokens with <bos>/<eos>
FAMILIES = ("rnn", "lstm", "gru")


def caption_batches(task: str, tokens_dir: Path, *, count: int, batch_size: int, seed: int = 0) -> tuple[Any, int]:
    """``count`` (tokens (B, L), lengths (B,)) batches and the vocabulary size."""
    rng = np.random.default_rng(seed)
    path = tokens_dir / CORPUS[task] / "train.npz"
    if path.is_file():
        data = np.load(path)
        all_tokens, all_lengths = data["tokens"], data["lengths"]
        vocab = int(all_tokens.max()) + 1
    else:
        low, high = DEFAULT_LENGTHS[task]
        vocab, n = 50, 4096
        all_lengths = rng.integers(low, high + 1, n)
        all_tokens = rng.integers(4, vocab, (n, high))
        all_tokens[:, 0] = 1  # <bos>
        for i, length in enumerate(all_lengths):
            all_tokens[i, length - 1], all_tokens[i, length:] = 2, 0  # <eos>, <pad>
    batches = []
    for _ in range(count):
        rows = rng.choice(len(all_lengths), batch_size, replace=False)
        lengths = all_lengths[rows]
        batches.append((torch.from_numpy(all_tokens[rows][:, : lengths.max()]).long(), torch.from_numpy(lengths).long()))
    return batches, vocab


def padded_steps(model: torch.nn.Module, visual: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The reference: every position of the padded batch through ``step``, then the same loss."""
    memory = model.encode(visual, lengths)
    state = model.init_state(memory)
    logits = []
    for t in range(tokens.size(1) - 1):
        step_logits, state = model.step(tokens[:, t], state, memory)
        logits.append(step_logits)
    return caption_loss(torch.stack(logits, dim=1), tokens[:, 1:])


def measure(task: str, family: str, *, params: Any, tokens_dir: Path, batches: int, repeats: int) -> dict[str, Any]:
    batch_size = params.train.batch_size
    data, vocab = caption_batches(task, tokens_dir, count=batches, batch_size=batch_size)
    dims = ModelDims(feature_dim=FEATURE_DIM, vocab_size=vocab)
    config = models.family_config(family, params.models.family(family))
    budget = params.models.match_params.budget(task)
    if budget is not None:
        config, _ = models.fit_to_budget(task, family, config, budget, dims=dims)
    torch.manual_seed(0)
    model = models.build_model(task, family, config, dims=dims).train()
    g = torch.Generator().manual_seed(1)
    visual = [torch.randn(batch_size, CELLS, FEATURE_DIM, generator=g) for _ in data]
    frames = torch.full((batch_size,), CELLS)

    def packed() -> None:
        for v, (tokens, lengths) in zip(visual, data):
            model.zero_grad(set_to_none=True)
            model(v, frames, tokens, lengths)[1].backward()

    def reference() -> None:
        for v, (tokens, _) in zip(visual, data):
            model.zero_grad(set_to_none=True)
            padded_steps(model, v, frames, tokens).backward()

    times: dict[str, list[float]] = {"packed": [], "reference": []}
    packed(), reference()  # warm-up
    for _ in range(repeats):
        for name, fn in (("packed", packed), ("reference", reference)):
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / len(data) * 1000)
    lengths = torch.cat([length for _, length in data]).float()
    widths = torch.tensor([float(length.max()) for _, length in data])
    return {"task": task, "family": family, "hidden": config.hidden_size,
            "mean_length": float(lengths.mean()), "mean_width": float(widths.mean()),
            "packed_ms": statistics.median(times["packed"]), "reference_ms": statistics.median(times["reference"])}


def render(rows: list[dict[str, Any]], *, args: argparse.Namespace) -> str:
    lines = [
        HEADING, "",
        f"`python benchmarks/decoder.py --batches {args.batches} --repeats {args.repeats}` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d')}. Forward and backward of one training batch of "
        "an attention captioner: **packed** (the rows still going at each step, the model's `forward`) against "
        "the **reference** (every step of the padded batch through `step`, what `forward` did before); median ms "
        "per batch, ratio reference / packed (> 1: packed is faster). Caption lengths: the training captions' "
        "mix (mean length / mean batch maximum, in tokens).", "",
        "| task | family | hidden | length / batch max | packed ms | reference ms | ratio |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['task']} | {r['family']} | {r['hidden']} | {r['mean_length']:.1f} / {r['mean_width']:.1f} | "
                     f"{r['packed_ms']:.1f} | {r['reference_ms']:.1f} | {r['reference_ms'] / r['packed_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=Path, default=Path("artifacts/tokens"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--docs", type=Path, default=None, help="replace the section in this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    params = load_params(args.params)
    rows = [measure(task, family, params=params, tokens_dir=args.tokens, batches=args.batches, repeats=args.repeats)
            for task in CORPUS for family in FAMILIES]
    text = render(rows, args=args)
    print(text)
    if args.docs is not None:
        replace_markdown_section(args.docs, HEADING, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
