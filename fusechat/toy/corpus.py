"""A synthetic chat corpus with three skills, deterministic from a seed.

- ``facts``: attributes of invented planets (memorised);
- ``arithmetic``: two-digit addition (held-out number pairs never appear in training);
- ``glossary``: meanings of invented words (memorised).

Memorised skills have three phrasings per question; for each fact one phrasing is held out (a
different one for different facts), so held-out questions ask a fact seen in training in a
phrasing seen in training, but never that fact in that phrasing.

Each row is ``{"skill": ..., "messages": [...]}`` in OpenAI format; the held-out split has one
single-turn question per row and doubles as the toy question set (its ``reference`` is the gold
answer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SKILLS = ("facts", "glossary", "arithmetic")
SYSTEM = "You are a helpful assistant."

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "qu", "th", "dr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "or", "en"]
_MEANINGS = [
    "river",
    "mountain",
    "bread",
    "friend",
    "storm",
    "lantern",
    "garden",
    "silver",
    "winter",
    "bridge",
    "forest",
    "mirror",
    "candle",
    "harbor",
    "feather",
    "thunder",
    "meadow",
    "anchor",
    "castle",
    "whisper",
    "valley",
    "ember",
    "orchard",
    "compass",
]
_COLORS = ["red", "blue", "green", "gold", "silver", "violet", "orange", "white", "black", "amber"]

# attribute -> (phrasings, answer)
_FACT_FORMS = {
    "capital": (
        [
            "What is the capital of {p}?",
            "Tell me the capital of {p}.",
            "Which city is the capital of {p}?",
        ],
        "The capital of {p} is {v}.",
    ),
    "color": (
        [
            "What color is the sky of {p}?",
            "Tell me the color of the sky on {p}.",
            "Which color does the sky of {p} have?",
        ],
        "The sky of {p} is {v}.",
    ),
    "ruler": (
        ["Who rules {p}?", "Tell me who the ruler of {p} is.", "Which person rules {p}?"],
        "{p} is ruled by {v}.",
    ),
}
_GLOSSARY_FORMS = [
    "What does the word {w} mean?",
    "Translate {w} into English.",
    "Give the English meaning of {w}.",
]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))


@dataclass
class World:
    facts: dict[str, dict[str, str]]  # planet -> attribute -> value
    train_pairs: list[tuple[int, int]]
    heldout_pairs: list[tuple[int, int]]
    glossary: dict[str, str]  # invented word -> English meaning


def make_world(seed: int, n_planets: int = 24, n_words: int = 72) -> World:
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n_planets * 3 + n_words:
        names.add(_word(rng, rng.choice([2, 3])))
    pool = sorted(names)
    rng.shuffle(pool)
    planets = [p.capitalize() for p in pool[:n_planets]]
    cities = [c.capitalize() for c in pool[n_planets : 2 * n_planets]]
    rulers = [r.capitalize() for r in pool[2 * n_planets : 3 * n_planets]]
    words = pool[3 * n_planets :]
    facts = {
        p: {"capital": cities[i], "color": rng.choice(_COLORS), "ruler": rulers[i]}
        for i, p in enumerate(planets)
    }
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    return World(
        facts=facts,
        train_pairs=pairs[:-500],
        heldout_pairs=pairs[-500:],
        glossary={w: rng.choice(_MEANINGS) for w in words},
    )


def _phrasing(forms: list[str], key: str, rng: random.Random, heldout: bool) -> str:
    """The held-out phrasing of fact ``key``, or one of its training phrasings."""
    held = random.Random(key).randrange(len(forms))
    if heldout:
        return forms[held]
    return rng.choice([f for i, f in enumerate(forms) if i != held])


def qa(world: World, skill: str, rng: random.Random, heldout: bool) -> tuple[str, str]:
    """One (question, answer) of ``skill``; ``heldout`` picks held-out phrasings or items."""
    if skill == "facts":
        planet = rng.choice(sorted(world.facts))
        attr = rng.choice(sorted(_FACT_FORMS))
        forms, answer = _FACT_FORMS[attr]
        q = _phrasing(forms, f"{planet}/{attr}", rng, heldout)
        return q.format(p=planet), answer.format(p=planet, v=world.facts[planet][attr])
    if skill == "arithmetic":
        a, b = rng.choice(world.heldout_pairs if heldout else world.train_pairs)
        q = "What is {a} + {b}?" if heldout or rng.random() < 0.5 else "Compute {a} plus {b}."
        return q.format(a=a, b=b), f"{a} + {b} = {a + b}."
    if skill == "glossary":
        w = rng.choice(sorted(world.glossary))
        q = _phrasing(_GLOSSARY_FORMS, w, rng, heldout).format(w=w)
        return q, f"The word {w} means {world.glossary[w]}."
    raise ValueError(f"unknown skill {skill!r}")


def make_corpus(
    seed: int, n_train: int, n_heldout_per_skill: int, mix: dict[str, float] | None = None
) -> dict[str, list[dict]]:
    """Train rows (a quarter two-turn, some with a system prompt) drawn with skill weights
    ``mix`` (uniform by default), and single-turn held-out rows, ``n_heldout_per_skill`` each."""
    world = make_world(seed)
    rng = random.Random(seed + 1)
    weights = [(mix or {}).get(s, 1.0) for s in SKILLS]
    train = []
    for _ in range(n_train):
        skill = rng.choices(SKILLS, weights)[0]
        msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.1 else []
        for _turn in range(2 if rng.random() < 0.25 else 1):
            q, a = qa(world, rng.choices(SKILLS, weights)[0] if _turn else skill, rng, False)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        train.append({"skill": skill, "messages": msgs})
    heldout = []
    for skill in SKILLS:
        hrng = random.Random(f"{seed}-{skill}")
        for _ in range(n_heldout_per_skill):
            q, a = qa(world, skill, hrng, True)
            heldout.append(
                {
                    "skill": skill,
                    "reference": a,
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                    ],
                }
            )
    return {"train": train, "heldout": heldout}
