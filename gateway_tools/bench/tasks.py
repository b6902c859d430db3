"""A labelled chat dataset generated offline: six small tasks a base model does not do out of the
box (dates in words, sums, word order, JSON, unit conversion, spelling), each answer exactly
determined by its question, so the loss on held-out questions measures what an adapter learned."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "forest", "candle", "rocket", "garden",
         "silver", "window", "market", "bottle", "dragon", "planet", "pencil", "island", "mirror"]  # fmt: skip
NAMES = ["Alice Smith", "Bob Jones", "Carla Diaz", "Dev Patel", "Erin Walsh", "Femi Okafor", "Gao Lin", "Hana Sato"]
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Pune", "Kyoto", "Quito", "Accra", "Turin", "Perth"]


def _date(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return f"Write the date {year}-{month:02d}-{day:02d} in words.", f"{MONTHS[month - 1]} {day}, {year}."


def _sum(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _json(rng: random.Random) -> tuple[str, str]:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    record = json.dumps({"name": name, "age": age, "city": city})
    return f"As JSON: {name} is {age} years old and lives in {city}.", record


def _meters(rng: random.Random) -> tuple[str, str]:
    km = rng.randint(2, 999)
    return f"How many meters are {km} kilometers?", f"{km} kilometers are {km * 1000} meters."


def _spell(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))
    return f"Spell the word {word} letter by letter.", "-".join(word.upper())


TASKS: list[Callable[[random.Random], tuple[str, str]]] = [_date, _sum, _reverse, _json, _meters, _spell]


def write_task_dataset(train: Path, held_out: Path, rows: int, held_out_rows: int, seed: int = 0) -> None:
    """`rows` training and `held_out_rows` held-out chat lines (JSONL), the tasks in turn, no
    question in both files."""
    rng = random.Random(seed)
    seen: set[str] = set()
    lines: list[str] = []
    for _ in range(100 * (rows + held_out_rows)):  # every task has thousands of distinct questions
        if len(lines) == rows + held_out_rows:
            break
        question, answer = TASKS[len(lines) % len(TASKS)](rng)
        if question in seen:
            continue
        seen.add(question)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}) + "\n")
    train.write_text("".join(lines[:rows]))
    held_out.write_text("".join(lines[rows:]))
