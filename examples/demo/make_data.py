"""Writes the demo's datasets: the same short texts in two styles (seeded, so the files are reproducible).

negative.jsonl (class -1): short paragraphs in plain English, each a few sentences on one topic
    (the sea, the weather, the market, friends, the crew, ...) drawn from the hand-written SENTENCES.
positive.jsonl (class +1): the same paragraphs in pirate speech: `piratize` swaps words
    ("is" → "be", "you" → "ye", "my" → "me", "-ing" → "-in'", ...) and adds a pirate's
    "Arr," / "Ahoy," before some sentences and ", matey" / ", me hearties" after some.
Pairs share their content, so the only thing that separates the classes is the style; the plain
paragraphs are ordinary, varied prose, so the adapter learns a style and no sentence pattern.
Run: python -m examples.demo.make_data   (the committed files are its output)
"""

import json
import random
import re
from pathlib import Path

# Plain sentences by topic; a paragraph is a few sentences of one topic, in random order.
SENTENCES = {
    "ship": [
        "The ship is old, but her hull is still strong.",
        "We sailed along the coast for three days before we saw another boat.",
        "The sails were torn in the storm, so we spent the morning mending them.",
        "Every morning the crew scrubs the deck and checks the ropes.",
        "Our ship is small and fast, and she handles the waves well.",
        "At night the ship creaks and rocks, and most of us sleep badly.",
        "The wind turned in the afternoon and carried us towards the islands.",
        "Nobody on board knows how old the ship really is.",
        "We are going to anchor in the bay and wait for the tide.",
        "The ship needs new paint, a new mast and a better cook.",
        "From the top of the mast you can see for miles.",
        "The water was so clear that we could see fish under the boat.",
    ],
    "weather": [
        "The weather today is grey and cold, and the wind is blowing from the north.",
        "It rained all night, and the streets were full of puddles in the morning.",
        "I think it will be sunny tomorrow, but you never know by the sea.",
        "The sky was clear and blue, and the sea was as flat as a mirror.",
        "A thick fog came in from the sea and hid the whole harbour.",
        "The storm lasted two days, and nobody left the house.",
        "In the summer the evenings are long and warm.",
        "The wind is too strong for the small boats to go out today.",
        "After the rain the air smelled fresh and clean.",
        "It is the coldest winter that anyone can remember.",
        "The clouds are getting darker, so we should go inside.",
        "When the sun came out, everyone went down to the beach.",
    ],
    "market": [
        "My friend and I went to the market to buy bread, cheese and apples.",
        "The market is busy on Saturdays, and you have to get there early.",
        "The baker sells the best bread in town, and it is still warm in the morning.",
        "We bought fresh fish from an old woman who has had a stall there for years.",
        "Everything at the market was cheaper than we expected.",
        "I spent all my money on spices, a new knife and a bag of oranges.",
        "The man at the fruit stall always gives the children a free plum.",
        "We were hungry, so we sat down and ate our lunch by the fountain.",
        "The cook wants potatoes, onions and a lot of salt for the soup.",
        "There was music in the square, and people were dancing between the stalls.",
        "You can find almost anything at the market if you know where to look.",
        "We carried the food home in two heavy baskets.",
    ],
    "friends": [
        "My friend is always late, but he never forgets a promise.",
        "We have known each other since we were children.",
        "Thank you for your help with the boxes yesterday.",
        "My friends and I like to walk along the cliffs on Sunday afternoons.",
        "She told me a story that I am still thinking about.",
        "If you need anything, you can always ask me.",
        "We laughed so much that our stomachs hurt.",
        "Your brother is coming to dinner tonight, is he not?",
        "I am very happy to see you again after all this time.",
        "We argued about nothing for an hour and then went home friends again.",
        "He is the most honest person I know.",
        "Are you coming with us to the harbour tomorrow?",
    ],
    "captain": [
        "The captain said that we would leave at first light.",
        "The captain is a quiet woman who notices everything.",
        "Nobody argues with the captain when she is in a bad mood.",
        "The captain looked at the map for a long time and then smiled.",
        "Our captain has sailed to every port on this coast.",
        "The captain told the crew to pull in the nets and get ready.",
        "When the captain speaks, the whole crew listens.",
        "The captain was worried about the storm, but she did not show it.",
        "The captain keeps a small book where she writes down every journey.",
        "The captain asked me to count the barrels in the hold.",
        "After dinner the captain told us about her first voyage.",
        "The captain is proud of her crew, and the crew is proud of her.",
    ],
    "harbour": [
        "The harbour is quiet in the early morning.",
        "Fishing boats come back to the harbour before the sun goes down.",
        "The lighthouse on the hill has warned ships for over a hundred years.",
        "Our village is small, but everyone knows everyone else.",
        "The old inn by the harbour serves hot soup and fresh bread.",
        "Children play on the beach while their parents mend the nets.",
        "The houses by the water are painted blue, yellow and white.",
        "A new ship arrived in the harbour this morning, and everyone went to look.",
        "The harbour master writes down the name of every ship that comes in.",
        "In the evening the lights of the village shine across the water.",
        "The road from the village to the harbour is steep and narrow.",
        "Everyone in the village is getting ready for the summer festival.",
    ],
    "treasure": [
        "The old map shows an island that is not on any other map.",
        "We are looking for a chest that was lost a long time ago.",
        "Some people say the treasure is only a story.",
        "We dug for hours, but we found nothing but stones and sand.",
        "The map was drawn by hand, and some of the names are hard to read.",
        "If we find the gold, we will share it with the whole crew.",
        "He keeps the key to the chest on a string around his neck.",
        "The island was covered in trees, and we could not see the shore from the middle.",
        "We followed the river until we found the old cave.",
        "Inside the chest there were coins, rings and a letter.",
        "Nobody believed us when we told them what we had found.",
        "The treasure is hidden somewhere near the lighthouse, I am sure of it.",
    ],
    "evening": [
        "In the evening we sat by the fire and told stories.",
        "The night was quiet, and the only sound was the sea.",
        "I was tired after the long day and went to bed early.",
        "We should go now, or we will miss the last boat home.",
        "The stars were bright, and the moon was almost full.",
        "My grandmother used to sing old songs about the sea.",
        "After supper we played cards until midnight.",
        "The cook made a big pot of stew, and everyone had two bowls.",
        "We listened to the rain on the roof and talked about home.",
        "It was late, but nobody wanted the evening to end.",
        "Please bring some more wood for the fire.",
        "Tomorrow is going to be a long day, so let us get some sleep.",
    ],
}

# Repeats weight the choice: a few frequent markers, rather than many rare ones, are what greedy decoding picks.
OPENERS = ["Arr", "Arr", "Arr", "Ahoy", "Avast", "Shiver me timbers", "Yo ho ho", "Arr, matey"]
CLOSERS = ["matey", "matey", "matey", "me hearties", "me hearties", "ye scallywag", "ye landlubber", "aye"]
# Whole words, lower case; the replacement keeps the word's capitalisation.
WORDS = {
    "is": "be",
    "are": "be",
    "am": "be",
    "was": "were",
    "isn't": "ain't",
    "aren't": "ain't",
    "you": "ye",
    "your": "yer",
    "yours": "yers",
    "you're": "ye be",
    "my": "me",
    "myself": "meself",
    "for": "fer",
    "of": "o'",
    "and": "an'",
    "over": "o'er",
    "before": "afore",
    "hello": "ahoy",
    "yes": "aye",
    "friend": "matey",
    "friends": "hearties",
    "money": "doubloons",
    "coins": "doubloons",
    "food": "grub",
    "lunch": "grub",
    "think": "reckon",
    "very": "mighty",
    "small": "wee",
    "little": "wee",
    "children": "young scallywags",
    "stories": "tales",
    "story": "tale",
    "nothing": "naught",
    "gold": "booty",
    "treasure": "booty",
    "people": "landlubbers",
}
NOT_ING = {"thing", "king", "ring", "rings", "sing", "bring", "string", "spring", "wing", "evening"}


def piratize_word(word: str) -> str:
    low = word.lower()
    if low in WORDS:
        new = WORDS[low]
    elif low.endswith("ing") and len(low) > 4 and low not in NOT_ING:
        new = low[:-1] + "'"  # sailing → sailin'
    else:
        return word
    return new[0].upper() + new[1:] if word[0].isupper() else new


def piratize(sentence: str, rng: random.Random) -> str:
    text = re.sub(r"[A-Za-z']+", lambda m: piratize_word(m.group(0)), sentence)
    body, end = text[:-1], text[-1]
    if rng.random() < 0.6:
        first = body.split(" ", 1)[0]
        keep = first in ("I", "I'm") or first.endswith("'")
        body = f"{rng.choice(OPENERS)}, {body if keep else body[0].lower() + body[1:]}"
    if rng.random() < 0.5 and end != "?":
        body, end = f"{body}, {rng.choice(CLOSERS)}", rng.choice([end, "!"])
    return body + end


def pair(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(sorted(SENTENCES))
    plain = rng.sample(SENTENCES[topic], rng.randint(3, 5))
    return " ".join(piratize(s, rng) for s in plain), " ".join(plain)


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
