"""Retriever training: contrastive fine-tuning of the embedder on the adapters' examples.

LoraRetriever (Zhao et al. 2024) trains its retriever but released no training code. Here:
pairs of two example inputs of the same adapter are positives, the other pairs in the batch
are negatives (MultipleNegativesRankingLoss), through sentence-transformers' own trainer.
Batches never hold two pairs of one adapter, so no in-batch negative is a false one. The
result is a normal sentence-transformers model folder, used by path like any other.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sentence_transformers.base.sampler import DefaultBatchSampler

from router.embedder import LORARETRIEVER_PREFIX, SentenceEmbedder, resolve_model_path


class DistinctLabelBatchSampler(DefaultBatchSampler):
    """Batches whose rows all have different `label`s: rounds of one row per label (in a
    seeded random order), cut into batches."""

    def _batches(self) -> list[list[int]]:
        labels = self.sampler["label"]  # BatchSampler keeps the dataset as `sampler`
        rng = random.Random(self.seed + getattr(self, "epoch", 0))
        by_label: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            by_label.setdefault(label, []).append(i)
        for rows in by_label.values():
            rng.shuffle(rows)
        batches = []
        while any(by_label.values()):
            round_ = [rows.pop() for rows in by_label.values() if rows]
            rng.shuffle(round_)
            batches += [
                round_[i : i + self.batch_size] for i in range(0, len(round_), self.batch_size)
            ]
        rng.shuffle(batches)
        return [b for b in batches if len(b) > 1 or not self.drop_last]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


@dataclass(frozen=True)
class RetrieverTrainConfig:
    """pairs_per_adapter: positive pairs drawn per adapter and epoch."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-5  # sentence-transformers' usual fine-tuning rate
    pairs_per_adapter: int = 64
    warmup_ratio: float = 0.1
    seed: int = 0


def positive_pairs(
    examples: Mapping[str, Sequence[str]], per_adapter: int, seed: int, prefix: str
) -> dict[str, list]:
    """Columns anchor / positive / label: two different examples of one adapter per row."""
    rng = random.Random(seed)
    anchor, positive, label = [], [], []
    for index, (_, texts) in enumerate(sorted(examples.items())):
        texts = [t for t in dict.fromkeys(texts) if t.strip()]
        if len(texts) < 2:
            continue
        for _ in range(per_adapter):
            a, b = rng.sample(texts, 2)
            anchor.append(prefix + a)
            positive.append(prefix + b)
            label.append(index)
    return {"anchor": anchor, "positive": positive, "label": label}


STATIC_PREFIX = "static:"


def starting_model(base: str):
    """The model to fine-tune. `static:<model>` starts a StaticEmbedding model (mean of
    per-token vectors, no attention) from <model>'s input embeddings: ~50x cheaper to run
    than the transformer, and task-discriminative once trained."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    if not base.startswith(STATIC_PREFIX):
        return SentenceTransformer(resolve_model_path(base), device="cpu")
    teacher = SentenceTransformer(
        resolve_model_path(base.removeprefix(STATIC_PREFIX)), device="cpu"
    )
    weights = teacher[0].auto_model.get_input_embeddings().weight.detach().clone()
    static = StaticEmbedding(teacher.tokenizer, embedding_weights=weights)
    return SentenceTransformer(modules=[static], device="cpu")


def train_retriever(
    examples: Mapping[str, Sequence[str]],
    out: Path | str,
    base: str = "all-MiniLM-L6-v2",
    prefix: str = LORARETRIEVER_PREFIX,
    config: RetrieverTrainConfig = RetrieverTrainConfig(),
) -> SentenceEmbedder:
    """Fine-tune `base` (a model name or path, or `static:<name>`, see `starting_model`) on
    {adapter name: example inputs}; save to `out`; return an embedder that uses the trained
    model with the same prefix."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    pairs = positive_pairs(examples, config.pairs_per_adapter, config.seed, prefix)
    if len(set(pairs["label"])) < 2:
        raise ValueError("retriever training needs at least two adapters with two or more examples")
    model = starting_model(base)
    out = Path(out)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        warmup_ratio=config.warmup_ratio,
        seed=config.seed,
        save_strategy="no",
        report_to=[],
        logging_steps=50,
        batch_sampler=DistinctLabelBatchSampler,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(pairs),
        loss=MultipleNegativesRankingLoss(model),
    )
    trainer.train()
    model.save(str(out))
    return SentenceEmbedder(model=str(out), prefix=prefix)
