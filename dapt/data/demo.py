"""A small synthetic movie-review corpus, written by the project, so the demo and tests run on a fresh
machine with no hub and no external data.

Reviews are assembled from phrase lists: mostly positive (or negative) judgements, some neutral
filler, an occasional concession to the other side, and IMDB's `<br />` paragraph breaks. Labels
follow the dominant sentiment, so the task is learnable but not a keyword lookup.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = [
    "The acting is superb from start to finish", "I loved every minute of it",
    "the script is sharp, witty and surprisingly moving", "a beautiful score carries the quieter scenes",
    "the cinematography is stunning", "it is one of the best films I have seen this year",
    "the lead gives a warm, honest performance", "the story kept me hooked until the very end",
    "the director handles the twists with real confidence", "I laughed out loud more than once",
    "the ending is perfect and earned", "a genuinely touching film", "the cast has wonderful chemistry",
    "it is clever without ever being smug", "I would happily watch it again",
    "the pacing is tight and the dialogue sparkles", "an absolute delight for the whole family",
    "the supporting cast is excellent", "a brilliant, heartfelt piece of work", "highly recommended",
]
NEGATIVE = [
    "The acting is wooden from start to finish", "I was bored for most of it",
    "the script is clumsy, flat and painfully predictable", "a loud score drowns out every scene",
    "the cinematography is murky and cheap", "it is one of the worst films I have seen this year",
    "the lead seems to have given up", "the story falls apart long before the end",
    "the director fumbles every twist", "not one joke landed",
    "the ending is lazy and makes no sense", "a tedious, joyless film", "the cast has no chemistry at all",
    "it is smug without ever being clever", "I want those two hours back",
    "the pacing drags and the dialogue is terrible", "a waste of a talented cast",
    "the supporting cast is awful", "a dull, lifeless piece of work", "avoid this one",
]
NEUTRAL = [
    "I saw it on a rainy Sunday afternoon", "it runs a little under two hours",
    "my brother recommended it to me", "it is based on a novel I have not read",
    "the film was shot in a small coastal town", "I went in knowing nothing about it",
    "it had a limited release in cinemas", "the trailer gives away very little",
    "the story follows two sisters over one summer", "it is the director's third feature",
]
ADJ = ["Silent", "Broken", "Golden", "Last", "Hidden", "Midnight", "Crimson", "Distant", "Electric", "Quiet"]
NOUN = ["Harbor", "Promise", "Garden", "Signal", "Kingdom", "Letters", "Horizon", "Station", "Winter", "Echo"]
GENRE = ["drama", "comedy", "thriller", "western", "romance", "horror film", "documentary", "musical"]


def review(rng: random.Random, label: int) -> str:
    own, other = (POSITIVE, NEGATIVE) if label == 1 else (NEGATIVE, POSITIVE)
    title = f"{rng.choice(ADJ)} {rng.choice(NOUN)}"
    sentences = [f"{title} is a {rng.choice(GENRE)} from {rng.randint(1950, 2024)}."]
    sentences += [rng.choice(NEUTRAL).capitalize() + "." for _ in range(rng.randint(0, 2))]
    body = [rng.choice(own) for _ in range(rng.randint(2, 4))]
    if rng.random() < 0.35:  # a concession: mixed reviews still lean one way
        body.insert(rng.randint(0, len(body)), "Still, " + rng.choice(other).lower())
    sentences += [s[0].upper() + s[1:] + "." for s in body]
    cut = rng.randint(1, len(sentences))
    return " ".join(sentences[:cut]) + "<br /><br />" + " ".join(sentences[cut:])


def write_demo_data(out_dir: Path, n_unlabelled: int = 800, n_train: int = 600, n_test: int = 300,
                    seed: int = 0) -> dict[str, Path]:
    """JSONL files `unlabelled` (text), `train` and `test` (text, label: 0 negative, 1 positive)."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, n, labelled in (("unlabelled", n_unlabelled, False), ("train", n_train, True),
                              ("test", n_test, True)):
        path = out_dir / f"{name}.jsonl"
        with path.open("w") as f:
            for i in range(n):
                label = i % 2 if labelled else rng.randint(0, 1)
                row = {"text": review(rng, label)}
                if labelled:
                    row["label"] = label
                f.write(json.dumps(row) + "\n")
        paths[name] = path
    return paths
