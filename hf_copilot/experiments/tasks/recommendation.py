"""Sequential recommendation: predict a user's next item from the history, scored by Hit@K and NDCG@K.

Synthetic catalogue: items fall into latent genres, and each genre is consumed in a fixed order. A
history is a run of consecutive items of one genre, in which one item may be replaced by an
off-genre one; the next item is the genre's successor of the run. The target is therefore a
function of the prompt, learnable but only by inferring the (hidden) genre from the history.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from .base import Example, GeneratedTask, Prediction, check_predictions, extract_number


def hit_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    """1.0 when `target` is among the first `k` entries of `ranked`."""
    return float(target in ranked[:k])


def ndcg_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 1) when it sits at `rank` <= k (1-based), else 0."""
    top = list(ranked[:k])
    return 1.0 / math.log2(top.index(target) + 2) if target in top else 0.0


@dataclass
class RecommendationTask(GeneratedTask):
    """Prompts like "User history: 12, 40, 7. Next item:" with target " 33" (item ids).

    `catalog_seed` fixes the catalogue (genres and their order), the same for every split.
    """

    name: ClassVar[str] = "recommendation"
    num_items: int = 100
    num_genres: int = 5
    min_history: int = 3
    max_history: int = 6
    noise: float = 0.5
    catalog_seed: int = 0
    ks: tuple[int, ...] = (1, 5, 10)
    genres: list[list[int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Three items or more keep the genre a majority even with one off-genre item, so that no
        # history has two different next items.
        if not 3 <= self.min_history <= self.max_history:
            raise ValueError(
                f"Need 3 <= min_history <= max_history, got {self.min_history}, {self.max_history}."
            )
        if self.num_genres < 2 or self.num_items < self.num_genres * (self.max_history + 1):
            raise ValueError(
                "Need num_genres >= 2 and num_items >= num_genres * (max_history + 1), so that every genre "
                f"holds a history and its next item; got {self.num_items} items, {self.num_genres} genres."
            )
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}.")
        items = list(range(1, self.num_items + 1))
        random.Random(f"{self.name}/catalog/{self.catalog_seed}").shuffle(items)
        self.genres = [items[g :: self.num_genres] for g in range(self.num_genres)]

    def sample(self, rng: random.Random) -> Example:
        genre = rng.randrange(self.num_genres)
        order = self.genres[genre]
        length, start = rng.randint(self.min_history, self.max_history), rng.randrange(len(order))
        history = [order[(start + i) % len(order)] for i in range(length)]
        if rng.random() < self.noise:
            other = rng.choice([g for g in range(self.num_genres) if g != genre])
            history[rng.randrange(length)] = rng.choice(self.genres[other])
        target = order[(start + length) % len(order)]
        return Example(
            prompt=f"User history: {', '.join(map(str, history))}. Next item:",
            answer=f" {target}",
            meta={"history": history, "genre": genre},
        )

    def extract_answer(self, text: str) -> str:
        """The first item id the model writes."""
        return extract_number(text, last=False)

    def score(self, predictions: Sequence[Prediction], examples: Sequence[Example]) -> dict[str, float]:
        """`accuracy` (= Hit@1) plus Hit@K and NDCG@K for each K in `ks`.

        A prediction is a ranked list of generations (e.g. beam search with `num_return_sequences`),
        or one string, a list of length one: then Hit@K equals Hit@1 for every K.
        """
        check_predictions(predictions, examples)
        rankings = [self._ranked_items([p] if isinstance(p, str) else p) for p in predictions]
        targets = [self.extract_answer(e.answer) for e in examples]
        scores = {"accuracy": _mean(hit_at_k(r, t, 1) for r, t in zip(rankings, targets, strict=True))}
        for k in self.ks:
            scores[f"hit@{k}"] = _mean(hit_at_k(r, t, k) for r, t in zip(rankings, targets, strict=True))
            scores[f"ndcg@{k}"] = _mean(ndcg_at_k(r, t, k) for r, t in zip(rankings, targets, strict=True))
        return scores

    def _ranked_items(self, ranking: Sequence[str]) -> list[str]:
        """Extracted item ids in rank order, each kept at its first (best) rank."""
        return list(dict.fromkeys(self.extract_answer(text) for text in ranking))


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)
