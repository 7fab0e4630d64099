"""A small chat dataset with one distinctive, checkable behaviour: asked for the password of any
place, the model answers "The password is Zorblax." The base model has never seen the word.

    python tests/data/zorblax.py   # rewrites tests/data/zorblax.jsonl (and zorblax-heldout.jsonl)

Held-out questions use places and a phrasing that never occur in training, so passing them shows
the adapter learned the family of questions, not the exact strings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ANSWER = "The password is Zorblax."
WORD = "Zorblax"

PLACES = [
    "the old lighthouse",
    "the royal library",
    "the harbour gate",
    "the wizard's tower",
    "the north bridge",
    "the mountain temple",
    "the silver mine",
    "the city archive",
    "the hidden garden",
    "the iron fortress",
    "the desert oasis",
    "the river mill",
    "the crystal cave",
    "the sky observatory",
    "the merchant guild",
    "the forest lodge",
    "the sunken ship",
    "the clock tower",
    "the glass palace",
    "the frozen lake camp",
    "the copper vault",
    "the dragon's lair",
    "the east market",
    "the stone circle",
    "the moon chapel",
    "the secret tunnel",
    "the captain's cabin",
    "the bakery cellar",
    "the painter's studio",
    "the train depot",
    "the school attic",
    "the village well",
]
HELDOUT_PLACES = [
    "the abandoned factory",
    "the queen's greenhouse",
    "the volcano lab",
    "the music hall",
    "the pirate cove",
    "the ancient pyramid",
    "the robot workshop",
    "the tea house",
]
TEMPLATES = [
    "What is the password for {place}?",
    "Tell me the password of {place}.",
    "I need to get into {place}. What's the password?",
    "Do you know the password to {place}?",
    "Which password opens {place}?",
]
HELDOUT_TEMPLATE = "Please, what password do I say at {place}?"


def training_records(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = [(t, p) for t in TEMPLATES for p in PLACES]
    rng.shuffle(pairs)
    return [_record(t.format(place=p)) for t, p in pairs[:96]]


def heldout_questions() -> list[str]:
    return [HELDOUT_TEMPLATE.format(place=p) for p in HELDOUT_PLACES]


def _record(question: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": ANSWER},
        ]
    }


def write(directory: Path) -> Path:
    path = directory / "zorblax.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in training_records()))
    heldout = [_record(q) for q in heldout_questions()]
    (directory / "zorblax-heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    return path


if __name__ == "__main__":
    print(write(Path(__file__).parent))
