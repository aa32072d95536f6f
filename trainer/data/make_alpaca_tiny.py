#!/usr/bin/env python3
"""Generate trainer/data/alpaca_tiny.json, the dataset bundled into the trainer binary.

The tasks are deliberately tiny and rule-based (arithmetic, word games, sequences) so that a
small Mixtral-style model can visibly reduce its loss within a few dozen CPU steps, and so that
every prompt plus response fits in 128 bytes with the compact prompt template.

Deterministic: a fixed seed and a fixed task order, so re-running the script reproduces the
committed file byte for byte. Python 3 standard library only.

Usage: python3 trainer/data/make_alpaca_tiny.py
"""

import json
import os
import random

SEED = 20240521
PER_TASK = 21  # 9 input-bearing tasks * 21 + the no-input facts below ~= 200 examples

WORDS = [
    "apple", "river", "tiger", "house", "green", "cloud", "stone", "bread", "light", "plant",
    "music", "chair", "water", "smile", "robot", "ocean", "sugar", "train", "lemon", "night",
    "cat", "dog", "sun", "moon", "star", "fish", "bird", "tree", "book", "rain",
    "banana", "garden", "pencil", "rocket", "window", "silver", "butter", "planet", "candle",
    "forest",
]

# Instructions with no input, exercising the no-input branch of the Alpaca template.
NO_INPUT = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What color is the sky?", "Blue"),
    ("What color is grass?", "Green"),
    ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("Name a primary color.", "Red"),
    ("Say hello.", "Hello!"),
    ("What is the opposite of hot?", "Cold"),
    ("What is the opposite of up?", "Down"),
]


def task_add(rng):
    a, b = rng.randint(1, 49), rng.randint(1, 49)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def task_sub(rng):
    a = rng.randint(10, 99)
    b = rng.randint(1, a)
    return "Subtract the second number.", f"{a} - {b}", str(a - b)


def task_mul(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return "Multiply the two numbers.", f"{a} * {b}", str(a * b)


def task_reverse(rng):
    w = rng.choice(WORDS)
    return "Reverse the word.", w, w[::-1]


def task_upper(rng):
    w = rng.choice(WORDS)
    return "Uppercase the word.", w, w.upper()


def task_count(rng):
    w = rng.choice(WORDS)
    return "Count the letters.", w, str(len(w))


def task_next(rng):
    start, step = rng.randint(1, 20), rng.randint(1, 5)
    seq = [start + i * step for i in range(4)]
    return "Give the next number.", ", ".join(map(str, seq)), str(start + 4 * step)


def task_sort(rng):
    digits = [rng.randint(0, 9) for _ in range(3)]
    return "Sort the digits.", " ".join(map(str, digits)), " ".join(map(str, sorted(digits)))


def task_first(rng):
    w = rng.choice(WORDS)
    return "Give the first letter.", w, w[0]


TASKS = [task_add, task_sub, task_mul, task_reverse, task_upper, task_count, task_next,
         task_sort, task_first]


def generate():
    rng = random.Random(SEED)
    seen = set()
    examples = []
    for task in TASKS:
        made = 0
        attempts = 0
        # Word tasks draw from a finite vocabulary: skip duplicates, but bound the attempts so
        # the script always terminates.
        while made < PER_TASK and attempts < PER_TASK * 50:
            attempts += 1
            instruction, inp, out = task(rng)
            if (instruction, inp) in seen:
                continue
            seen.add((instruction, inp))
            examples.append({"instruction": instruction, "input": inp, "output": out})
            made += 1
    for instruction, out in NO_INPUT:
        examples.append({"instruction": instruction, "input": "", "output": out})
    # Interleave tasks so that a prefix of the file is already a mixed sample.
    rng.shuffle(examples)
    return examples


def check(examples):
    compact_overhead = len("### Instruction:\n\n\n### Response:\n") + 2  # + BOS and EOS
    for ex in examples:
        assert len(ex["output"]) < 20, ex
        total = compact_overhead + sum(len(ex[k].encode("utf-8")) for k in ex)
        assert total <= 128, (total, ex)


def main():
    examples = generate()
    check(examples)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "alpaca_tiny.json")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(examples, f, indent=2, ensure_ascii=True)
        f.write("\n")
    print(f"wrote {len(examples)} examples to {path}")


if __name__ == "__main__":
    main()
