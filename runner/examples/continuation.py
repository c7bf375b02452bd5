"""A tiny continuation "model" for the `shard` example: a word n-gram model built from shipped
text, so the example runs anywhere, with no download and no GPU.

As a shard command (what `specs/pipeline/continuation.yaml` runs):

    python -m runner.examples.continuation --input {input} --output {output} \\
        --low {low} --high {high} --done {done}

it continues each prompt of its id range and writes id, prompt, continuation to `--output`.
A CSV output is appended row by row, and ids listed in `--done` (rows an interrupted attempt
already wrote) are skipped, so a retried or resumed shard picks up where it stopped. As a
function (`fn: {_target_: runner.examples.continuation.continue_frame}`) it maps a DataFrame.
Each continuation is seeded by (seed, id): reruns and resumes give identical text.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

CORPUS = Path(__file__).resolve().parents[1] / "specs" / "data" / "continuation" / "corpus.txt"
END = "."


class NGram:
    """Word n-gram counts with backoff to shorter contexts."""

    def __init__(self, text: str, order: int = 3) -> None:
        self.order = order
        self.next: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
        for line in text.splitlines():
            words = line.replace(END, f" {END}").split()
            for n in range(len(words)):
                for k in range(order):
                    if n - k >= 0:
                        self.next[tuple(words[n - k : n])][words[n]] += 1

    def continue_(self, prompt: str, rng: random.Random, max_words: int) -> str:
        words = prompt.split()
        out: list[str] = []
        while len(out) < max_words:
            word = self._sample([*words, *out], rng)
            if word == END:
                break
            out.append(word)
        return " ".join(out)

    def _sample(self, history: list[str], rng: random.Random) -> str:
        for k in range(self.order - 1, -1, -1):
            context = tuple(history[len(history) - k :]) if k else ()
            counts = self.next.get(context)
            if counts:
                choices = sorted(counts)
                return rng.choices(choices, weights=[counts[c] for c in choices])[0]
        return END


@functools.cache
def model(corpus: str = str(CORPUS), order: int = 3) -> NGram:
    """The model of a corpus file, built once per process."""
    return NGram(Path(corpus).read_text(), order)


def continuation(uid: object, prompt: str, seed: int = 0, max_words: int = 12) -> str:
    """The continuation of one prompt; the same (seed, id) always gives the same text."""
    return model().continue_(str(prompt), random.Random(f"{seed}:{uid}"), max_words)


def continue_frame(
    frame: pd.DataFrame,
    seed: int = 0,
    max_words: int = 12,
    id_column: str = "id",
    column: str = "prompt",
) -> pd.DataFrame:
    """`fn` form: the frame with a `continuation` column added."""
    out = frame.copy()
    out["continuation"] = [
        continuation(uid, prompt, seed, max_words)
        for uid, prompt in zip(frame[id_column], frame[column], strict=True)
    ]
    return out


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="prompts: .csv or .parquet")
    parser.add_argument("--output", required=True, help=".csv (appended) or .parquet")
    parser.add_argument("--low", help="first id of the range (ids outside are ignored)")
    parser.add_argument("--high", help="first id past the range: [low, high), half-open")
    parser.add_argument("--done", help="a file of ids already written to --output")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--column", default="prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-words", type=int, default=12)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per prompt")
    parser.add_argument("--every", type=int, default=100, help="report progress every N rows")
    return parser.parse_args(argv)


def _rows(args: argparse.Namespace) -> tuple[pd.DataFrame, int]:
    import pandas as pd

    path = Path(args.input)
    frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    ids = frame[args.id_column]
    if args.low is not None and args.high is not None:
        kind = type(ids.iloc[0]) if len(ids) else str
        low, high = (kind(args.low), kind(args.high)) if kind is not str else (args.low, args.high)
        frame = frame[(ids >= low) & (ids < high)]
    done = set()
    if args.done and os.path.exists(args.done):
        done = set(Path(args.done).read_text().split())
    return frame[~frame[args.id_column].astype(str).isin(done)], len(done)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    frame, skipped = _rows(args)
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    print(f"continuing {len(frame)} prompt(s), {skipped} already done; GPUs: {gpus or 'none'}")
    output = Path(args.output)
    if output.suffix != ".csv":
        out = continue_frame(frame, args.seed, args.max_words, args.id_column, args.column)
        out.to_parquet(output, index=False)
        print(f"wrote {len(out)} row(s)")
        return 0
    new = not output.exists() or output.stat().st_size == 0
    with output.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow([*frame.columns, "continuation"])
        for n, row in enumerate(frame.itertuples(index=False), 1):
            values = list(row)
            uid, prompt = getattr(row, args.id_column), getattr(row, args.column)
            writer.writerow([*values, continuation(uid, prompt, args.seed, args.max_words)])
            f.flush()
            if args.delay:
                time.sleep(args.delay)
            if n % args.every == 0:
                print(f"{n}/{len(frame)} prompts")
    print(f"wrote {len(frame)} row(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
