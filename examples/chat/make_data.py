"""Write the chat example's data: the same user questions answered in two styles.

    python -m examples.chat.make_data      (writes examples/chat/{cheerful,terse}.jsonl)

Each record is an OpenAI-style conversation, `{"messages": [{"role", "content"}, ...]}`: an optional
system prompt, one or two user questions about a topic, and the assistant's answers. The answers
state the same fact in both files; only their style differs — cheerful (exclamations, a friendly
opener and closer) in cheerful.jsonl, terse (the bare fact after a one-word lead) in terse.jsonl — so the one
thing that separates the two classes is the assistant's style. Deterministic (seeded).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONVERSATIONS = 240

FACTS = {
    "the moon": "The moon takes about 27 days to circle the Earth and always shows us the same face.",
    "honey bees": "Honey bees visit millions of flowers to make a single jar of honey.",
    "the Pacific Ocean": "The Pacific is the largest and deepest ocean, covering about a third of the planet.",
    "volcanoes": "Volcanoes form where molten rock from deep below escapes through the crust.",
    "rainbows": "A rainbow appears when sunlight is bent and reflected inside raindrops.",
    "octopuses": "An octopus has three hearts and can change the colour of its skin in a moment.",
    "the Sahara": "The Sahara is the largest hot desert, and its sand dunes can be taller than towers.",
    "lightning": "Lightning heats the air around it to several times the temperature of the sun's surface.",
    "penguins": "Penguins cannot fly, but they swim fast and dive deep to catch fish.",
    "the human heart": "The human heart beats about one hundred thousand times a day.",
    "glaciers": "Glaciers are rivers of ice that move slowly downhill under their own weight.",
    "owls": "Owls can turn their heads much further than people can, and they hunt at night.",
    "tea": "Tea is made from the leaves of one plant, and its colour depends on how they are dried.",
    "bread": "Bread rises because yeast makes small bubbles of gas in the dough.",
    "the Nile": "The Nile flows north through eleven countries before it reaches the sea.",
    "snowflakes": "Every snowflake grows six arms, shaped by the cold and wet air it falls through.",
    "whales": "Blue whales are the largest animals that have ever lived on Earth.",
    "bicycles": "A bicycle stays upright mostly because of how its front wheel steers as it moves.",
    "coffee": "Coffee beans are the seeds of a red fruit that grows on small trees.",
    "tides": "Tides rise and fall twice a day, pulled by the moon and the sun.",
    "mountains": "Many mountains form when two plates of the Earth's crust push against each other.",
    "sleep": "During sleep the brain sorts the memories of the day.",
    "chess": "Chess began in India about fifteen centuries ago and spread along trade routes.",
    "maple trees": "Maple syrup is made by boiling down the sap of maple trees in early spring.",
    "the wind": "Wind is air moving from places of high pressure towards places of low pressure.",
    "dolphins": "Dolphins call each other with whistles that work a little like names.",
    "clouds": "Clouds are made of tiny drops of water or ice floating in the air.",
    "the desert fox": "The fennec fox has huge ears that help it stay cool in the desert heat.",
    "salt": "Sea salt is left behind when sea water dries in the sun.",
    "the stars": "Most stars we see at night are much larger and brighter than our sun.",
}
QUESTIONS = [
    "What can you tell me about {}?",
    "Tell me something about {}.",
    "Do you know anything interesting about {}?",
    "Could you explain {} to me?",
    "I was wondering about {}. What should I know?",
    "Give me one fact about {}.",
]
FOLLOW_UPS = ["And what about {}?", "Interesting. What about {}?", "Now tell me about {}."]
SYSTEMS = ["You are a helpful assistant.", "You answer questions about the world.", None, None]
OPENERS = ["Oh, what a great question!", "Ooh, I love this one!", "Happy to tell you!", "What a fun topic!"]
TERSE = ["Briefly:", "In short:", "Answer:", "Fact:"]
CLOSERS = ["Isn't that amazing?", "How cool is that!", "Nature is wonderful, isn't it?", "I hope that made you smile!"]


def cheerful(fact: str, rng: random.Random) -> str:
    return f"{rng.choice(OPENERS)} {fact[:-1]}! {rng.choice(CLOSERS)}"


def terse(fact: str, rng: random.Random) -> str:
    return f"{rng.choice(TERSE)} {fact[0].lower()}{fact[1:]}"


def conversations(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(cheerful, terse) records: the same conversations, the assistant's answers in each style."""
    rng = random.Random(seed)
    topics = list(FACTS)
    out = ([], [])
    for _ in range(CONVERSATIONS):
        system = rng.choice(SYSTEMS)
        asked = rng.sample(topics, 2 if rng.random() < 0.3 else 1)
        styled = ([], [])
        for i, topic in enumerate(asked):
            question = (rng.choice(QUESTIONS) if i == 0 else rng.choice(FOLLOW_UPS)).format(topic)
            state = rng.getstate()
            for k, style in enumerate((cheerful, terse)):
                rng.setstate(state)  # the same draws for both styles
                styled[k].extend(
                    [{"role": "user", "content": question}, {"role": "assistant", "content": style(FACTS[topic], rng)}]
                )
        for k in range(2):
            head = [{"role": "system", "content": system}] if system else []
            out[k].append({"messages": head + styled[k]})
    return out


def main() -> None:
    for name, records in zip(("cheerful", "terse"), conversations()):
        path = HERE / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"{path}: {len(records)} conversations")


if __name__ == "__main__":
    main()
