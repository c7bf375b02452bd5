"""Generate the continuation example's data: a small corpus and 1200 prompts, deterministically.

    python runner/specs/data/continuation/make_data.py

rewrites corpus.txt, prompts.csv and demo_prompts.csv.

The corpus is sentences from a small grammar (no download, no licence question); the n-gram
model of `runner.examples.continuation` is built from it. Prompts are sentence openings from
the same grammar, written in shuffled id order so shards are seen to follow sorted ids, not
the file's row order.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SENTENCES = 2500
PROMPTS = 1200
# the demo pipeline's shard stage takes the first rows only, to stay quick on 2 CPUs
DEMO_PROMPTS = 300

# fmt: off
SUBJECTS = [
    "the engineer", "the old sailor", "a curious child", "the night nurse", "my neighbour",
    "the river", "a quiet robot", "the baker", "the tired student", "our captain",
    "the gardener", "a stray cat", "the village choir", "the train driver", "the librarian",
]
VERBS = [
    "repaired", "watched", "followed", "painted", "carried", "forgot", "found", "measured",
    "sang about", "wrote to", "waited for", "argued with", "listened to", "cleaned", "opened",
]
OBJECTS = [
    "the broken lantern", "a long letter", "the silver bridge", "the morning train",
    "an empty boat", "the last apple", "a map of the coast", "the heavy door", "the garden wall",
    "a box of tools", "the winter coat", "the small radio", "a row of candles", "the red kite",
]
PLACES = [
    "near the harbour", "in the rain", "before dawn", "behind the mill", "at the market",
    "under the bridge", "on the hill", "after supper", "in the old station", "by the sea",
]
ENDINGS = [
    "and smiled", "without a word", "for the third time", "as the bells rang",
    "while the town slept", "and then went home", "with great care", "to everyone's surprise",
]
# fmt: on


def sentence(rng: random.Random) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
    if rng.random() < 0.7:
        words.append(rng.choice(PLACES))
    if rng.random() < 0.5:
        words.append(rng.choice(ENDINGS))
    return " ".join(words) + "."


def main() -> None:
    rng = random.Random(20240501)
    lines = [sentence(rng) for _ in range(SENTENCES)]
    (HERE / "corpus.txt").write_text("\n".join(lines) + "\n")
    prompts = []
    for n in range(PROMPTS):
        words = sentence(rng).rstrip(".").split()
        prompts.append((n, " ".join(words[: rng.randint(2, 5)])))
    rng.shuffle(prompts)
    _write(HERE / "prompts.csv", prompts)
    _write(HERE / "demo_prompts.csv", [p for p in prompts if p[0] < DEMO_PROMPTS])


def _write(path: Path, prompts: list[tuple[int, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "prompt"])
        writer.writerows(prompts)


if __name__ == "__main__":
    main()
