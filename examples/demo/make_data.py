"""Writes the demo's datasets: the same short texts in two styles (seeded, so the files are reproducible).

positive.jsonl (class +1): pirate speech — "Arr, matey! The sea be calm today, aye."
negative.jsonl (class -1): the same content in plain, neutral English.
Pairs share their content, so the only thing that separates the classes is the style.
Run: python -m examples.demo.make_data   (the committed files are its output)
"""

import json
import random
from pathlib import Path

SUBJECTS = [
    ("the ship", "the ship"),
    ("our crew", "our crew"),
    ("the captain", "the captain"),
    ("the old map", "the old map"),
    ("the harbour", "the harbour"),
    ("my friend", "me hearty"),
    ("the cook", "the cook"),
    ("the weather", "the weather"),
    ("the market", "the market"),
    ("the small boat", "the wee boat"),
    ("the village", "the village"),
    ("the lighthouse", "the lighthouse"),
]
STATES = [
    ("is calm today", "be calm today"),
    ("is ready to leave", "be ready to set sail"),
    ("is full of gold", "be full o' gold"),
    ("is very old", "be mighty old"),
    ("is looking for treasure", "be lookin' fer treasure"),
    ("is tired after the long trip", "be weary after the long voyage"),
    ("is waiting for the tide", "be waitin' fer the tide"),
    ("is bigger than I thought", "be bigger than I reckoned"),
    ("is hungry again", "be starvin' again"),
    ("is singing a song", "be singin' a shanty"),
]
OPENERS = ["Arr, matey!", "Ahoy!", "Shiver me timbers!", "Yo ho ho!", "Avast!", "Blimey!"]
CLOSERS = ["aye.", "arr!", "ye scallywag!", "by Davy Jones!", "savvy?", "yo ho!"]
EXTRA = [
    ("We should go now.", "We best be shovin' off now."),
    ("I think it will rain.", "I reckon the sky be fixin' to pour."),
    ("Please bring the food.", "Fetch the grub, ye landlubber."),
    ("Thank you for your help.", "Thank ye kindly fer yer help."),
    ("The night was quiet.", "The night were quiet as a sleepin' kraken."),
    ("Let us count the money.", "Let's be countin' the doubloons."),
]


def pair(rng: random.Random) -> tuple[str, str]:
    plain, pirate = [], []
    for _ in range(rng.randint(2, 4)):
        (s_plain, s_pirate), (v_plain, v_pirate) = rng.choice(SUBJECTS), rng.choice(STATES)
        plain.append(f"{s_plain.capitalize()} {v_plain}.")
        pirate.append(f"{rng.choice(OPENERS)} {s_pirate.capitalize()} {v_pirate}, {rng.choice(CLOSERS)}")
        if rng.random() < 0.5:
            e_plain, e_pirate = rng.choice(EXTRA)
            plain.append(e_plain)
            pirate.append(e_pirate)
    return " ".join(pirate), " ".join(plain)


def main(n: int = 320, seed: int = 0) -> None:
    rng = random.Random(seed)
    here = Path(__file__).parent
    pairs = [pair(rng) for _ in range(n)]
    for name, idx in (("positive.jsonl", 0), ("negative.jsonl", 1)):
        with open(here / name, "w") as f:
            for p in pairs:
                f.write(json.dumps({"text": p[idx]}) + "\n")
    print(f"wrote {n} pairs to {here}")


if __name__ == "__main__":
    main()
