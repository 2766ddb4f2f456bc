"""Built-in tasks, generated with held-out eval splits and answers that can be checked exactly.

``extract`` (the default, ~100 tokens a row with SmolLM2's template): pull a person, a city and a year out
of a sentence as one line of JSON. Its answers can be checked exactly, a 135M instruct model does not
produce the format unprompted, and it is learnable in minutes on a CPU. Eval rows use names and cities never
seen in training, so a gain means the skill was learned, not memorised. The others exist to choose recipes
on more than one kind of data (``generated:TASK``): ``reverse`` (~45 tokens: reverse a few letters),
``lookup`` (~400 tokens: find one entry in a long directory, answer with a number) and ``shopping``
(multi-turn, ~150 tokens: keep a list across turns; every assistant turn is trained, the last is scored).
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


def _extract(rng: random.Random, split: str) -> dict:
    pools = (_TRAIN_FIRST, _TRAIN_LAST, _TRAIN_CITIES) if split == "train" else (_EVAL_FIRST, _EVAL_LAST, _EVAL_CITIES)
    return make_row(rng, *pools)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _reverse(rng: random.Random, split: str) -> dict:
    """Eval rows use sequences that start with a letter no training row starts with."""
    first = _LETTERS[:20] if split == "train" else _LETTERS[20:]
    seq = [rng.choice(first)] + [rng.choice(_LETTERS) for _ in range(rng.randint(3, 5))]
    return {"messages": [{"role": "user", "content": f"Reverse the letters: {' '.join(seq)}"},
                         {"role": "assistant", "content": " ".join(reversed(seq))}]}


def _lookup(rng: random.Random, split: str) -> dict:
    """A directory of 20 people; the question names one of them. Eval directories use held-out names."""
    first, last, cities = ((_TRAIN_FIRST, _TRAIN_LAST, _TRAIN_CITIES) if split == "train"
                           else (_EVAL_FIRST, _EVAL_LAST, _EVAL_CITIES))
    names = set()
    while len(names) < min(20, len(first) * len(last)):
        names.add(f"{rng.choice(first)} {rng.choice(last)}")
    entries = [(n, rng.choice(cities), rng.randint(1000, 9999)) for n in sorted(names, key=lambda _: rng.random())]
    who, _, ext = rng.choice(entries)
    listing = "\n".join(f"- {n}, office in {c}, extension {e}" for n, c, e in entries)
    return {"messages": [
        {"role": "user", "content": f"Staff directory:\n{listing}\n\nWhat is the extension of {who}? "
                                    "Answer with the number only."},
        {"role": "assistant", "content": str(ext)}]}


_ITEMS = ["eggs", "rice", "tea", "milk", "bread", "apples", "butter", "honey", "salt", "beans", "onions",
          "pasta", "cheese", "lemons", "coffee", "flour", "sugar", "carrots", "yogurt", "oats", "pears", "garlic"]
_EVAL_ITEMS, _TRAIN_ITEMS = _ITEMS[-6:], _ITEMS[:-6]


def _shopping(rng: random.Random, split: str) -> dict:
    """A shopping list kept across 3-4 user turns (add, add, maybe remove); eval rows use held-out items."""
    pool = list(_TRAIN_ITEMS if split == "train" else _EVAL_ITEMS)
    rng.shuffle(pool)
    items = [pool.pop()]
    msgs = [{"role": "user", "content": f"Start a shopping list with {items[0]}."},
            {"role": "assistant", "content": f"List: {items[0]}"}]
    for _ in range(rng.randint(2, 3)):
        if len(items) > 1 and rng.random() < 0.3:
            gone = rng.choice(items)
            items.remove(gone)
            msgs.append({"role": "user", "content": f"Remove {gone}."})
        else:
            items.append(pool.pop())
            msgs.append({"role": "user", "content": f"Add {items[-1]}."})
        msgs.append({"role": "assistant", "content": "List: " + ", ".join(items)})
    return {"messages": msgs}


TASKS = {"extract": _extract, "reverse": _reverse, "lookup": _lookup, "shopping": _shopping}
DEFAULT_TASK = "extract"


def is_generated(spec: str) -> bool:
    return spec == "generated" or spec.startswith("generated:")


def task_of(spec: str) -> str:
    """``generated`` -> the default task; ``generated:NAME`` -> NAME (checked)."""
    name = spec.partition(":")[2] or DEFAULT_TASK
    if name not in TASKS:
        from sft_ray.config import ConfigError

        raise ConfigError(f"{spec}: unknown built-in task {name!r} (tasks: {', '.join(TASKS)})")
    return name


def generate(n: int, seed: int, split: str = "train", task: str = DEFAULT_TASK) -> list[dict]:
    rng = random.Random(f"{seed}-{split}" if task == DEFAULT_TASK else f"{task}-{seed}-{split}")
    return [TASKS[task](rng, split) for _ in range(n)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def write_task(out_dir: Path, n_train: int, n_eval: int, seed: int, task: str = DEFAULT_TASK) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl (deterministic for a seed) and return their paths."""
    return (
        write_jsonl(generate(n_train, seed, "train", task), out_dir / "train.jsonl"),
        write_jsonl(generate(n_eval, seed, "eval", task), out_dir / "eval.jsonl"),
    )
