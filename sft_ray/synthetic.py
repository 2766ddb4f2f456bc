"""The built-in task: pull a person, a city and a year out of a sentence as one line of JSON.

Why this task: its answers can be checked exactly, a 135M instruct model does not produce the exact
format unprompted, and it is learnable in minutes on a CPU (format + copying). Eval rows use names and
cities never seen in training, so a gain means the skill was learned, not memorised.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = "Extract the person, city and year from the sentence. Answer with JSON only."

_FIRST = [
    "Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jamal", "Keiko", "Lars",
    "Maya", "Nikos", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yusuf",
    "Zara", "Amir", "Bianca", "Carlos", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ingrid", "Jonas", "Kira",
]
_LAST = [
    "Moreau", "Silva", "Nakamura", "Okafor", "Kowalski", "Haddad", "Lindqvist", "Petrov", "Rossi", "Schmidt",
    "Tanaka", "Ibrahim", "Novak", "Costa", "Jensen", "Garcia", "Mensah", "Dubois", "Fischer", "Yilmaz",
    "Andersson", "Bauer", "Castillo", "Duarte", "Eriksen", "Ferrari", "Gruber", "Horvat", "Ivanova", "Kim",
]
_CITIES = [
    "Lisbon", "Osaka", "Nairobi", "Toronto", "Krakow", "Beirut", "Oslo", "Lima", "Hanoi", "Dublin",
    "Seville", "Tbilisi", "Accra", "Porto", "Kyoto", "Valencia", "Quito", "Riga", "Tunis", "Zagreb",
    "Bergen", "Cusco", "Dakar", "Geneva", "Harbin", "Izmir", "Jaipur", "Kazan", "Leeds", "Malmo",
]
_TEMPLATES = [
    "In {year}, {name} moved to {city} to open a small bakery.",
    "{name} was born in {city} in {year}.",
    "The conference in {city} in {year} was organised by {name}.",
    "After years abroad, {name} returned to {city} in {year}.",
    "{name} painted the mural that still stands in {city}; it was finished in {year}.",
    "It was {year} when {name} first visited {city}.",
    "Records show that {name} taught mathematics in {city} from {year}.",
    "{city} welcomed {name} as its new librarian in {year}.",
]

# Held out from training: eval rows draw names/cities only from these.
_EVAL_FIRST, _EVAL_LAST, _EVAL_CITIES = _FIRST[-8:], _LAST[-6:], _CITIES[-8:]
_TRAIN_FIRST, _TRAIN_LAST, _TRAIN_CITIES = _FIRST[:-8], _LAST[:-6], _CITIES[:-8]


def answer(name: str, city: str, year: int) -> str:
    return json.dumps({"name": name, "city": city, "year": year})


def make_row(rng: random.Random, first, last, cities) -> dict:
    name = f"{rng.choice(first)} {rng.choice(last)}"
    city, year = rng.choice(cities), rng.randint(1900, 2024)
    sentence = rng.choice(_TEMPLATES).format(name=name, city=city, year=year)
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\nSentence: {sentence}"},
            {"role": "assistant", "content": answer(name, city, year)},
        ]
    }


def generate(n: int, seed: int, split: str = "train") -> list[dict]:
    rng = random.Random(f"{seed}-{split}")
    pools = (_TRAIN_FIRST, _TRAIN_LAST, _TRAIN_CITIES) if split == "train" else (_EVAL_FIRST, _EVAL_LAST, _EVAL_CITIES)
    return [make_row(rng, *pools) for _ in range(n)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def write_task(out_dir: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl (deterministic for a seed) and return their paths."""
    return (
        write_jsonl(generate(n_train, seed, "train"), out_dir / "train.jsonl"),
        write_jsonl(generate(n_eval, seed, "eval"), out_dir / "eval.jsonl"),
    )
