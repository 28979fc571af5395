"""A stochastic chat language with three skills, deterministic from a seed.

- ``facts``: attributes of invented planets: a capital and a ruler (one value each), sky
  colours (four) and moons (six: any of them is a right answer);
- ``glossary``: invented words, each with eight English renderings;
- ``arithmetic``: two-digit addition (held-out number pairs never appear in training).

The language is stochastic, as real chat is: an answer is one sample from fixed probabilities
over its phrasings (``The capital of X is Y.`` 0.5, ``X has the capital Y.`` 0.3, ``In X the
capital is Y.`` 0.2; each restates the item before its value) and, for colours, moons and
renderings, over the item's ``n`` values (``p_i = (n - i) / sum``: 0.4 / 0.3 / 0.2 / 0.1 for
four, in an order of the item's own). A model that knows the language predicts that whole
distribution; one gold sample shows a single branch. This is the knowledge fusion can move and
text alone cannot: a small corpus names each planet's moons a few times and misses some, while
a source that learned the language from far more data puts the right mass on all of them.

Held-out rows are fresh samples of the same language (the questions as training asks them,
answers sampled anew; arithmetic on number pairs never trained). An earlier world held one
question phrasing per item out; every fine-tuned pivot, CLM or fused, memorised the training
rows and failed on the unseen pairing alike (held-out value NLL 2.97 nats per answer against
0.62 on training rows), which measured the student's generalisation over phrasings, something
no teacher distribution on the corpus can show, and tripled the seed noise. Each row is
``{"skill", "messages"}`` in OpenAI format; held-out rows add ``reference`` (the sampled
answer) and ``answers`` (every right value: the rule judge accepts any); the prompt rows are the
training rows with ``answers`` of their last question (implicit fusion's reward checks them).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

SKILLS = ("facts", "glossary", "arithmetic")
SYSTEM = "You are a helpful assistant."
N_VALUES = {"color": 4, "moon": 6, "glossary": 8}  # values of a many-valued item
GENERIC_SEED = 7919  # another world of the same language: general competence, no shared items

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "qu", "th", "dr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "or", "en"]
_COLORS = ["red", "blue", "green", "gold", "silver", "violet", "orange", "white", "black", "amber"]
_SYNONYMS = [
    ("river", "stream", "brook", "creek"),
    ("mountain", "peak", "summit", "hill"),
    ("bread", "loaf", "bun", "roll"),
    ("friend", "companion", "ally", "comrade"),
    ("storm", "tempest", "gale", "squall"),
    ("lantern", "lamp", "torch", "candle"),
    ("garden", "orchard", "meadow", "field"),
    ("mirror", "glass", "window", "pane"),
    ("winter", "frost", "snow", "ice"),
    ("bridge", "arch", "crossing", "ford"),
    ("forest", "woods", "grove", "thicket"),
    ("harbor", "port", "dock", "pier"),
]

_MEANINGS = [w for group in _SYNONYMS for w in group]

# question phrasings, answer phrasings with their probabilities
_Q = {
    "capital": ("What is the capital of {p}?", "Tell me the capital of {p}.",
                "Which city is the capital of {p}?"),
    "color": ("What color is the sky of {p}?", "Tell me the color of the sky on {p}.",
              "Which color does the sky of {p} have?"),
    "ruler": ("Who rules {p}?", "Tell me who the ruler of {p} is.", "Which person rules {p}?"),
    "moon": ("Name a moon of {p}.", "Tell me one moon of {p}.", "Which moon orbits {p}?"),
    "glossary": ("What does the word {w} mean?", "Translate {w} into English.",
                 "Give the English meaning of {w}."),
}  # fmt: skip
_A = {
    "capital": (("The capital of {p} is {v}.", 0.5), ("{p} has the capital {v}.", 0.3),
                ("In {p} the capital is {v}.", 0.2)),
    "color": (("The sky of {p} is {v}.", 0.5), ("{p} has a {v} sky.", 0.3),
              ("In {p} the sky is {v}.", 0.2)),
    "ruler": (("{p} is ruled by {v}.", 0.5), ("The ruler of {p} is {v}.", 0.3),
              ("In {p} the ruler is {v}.", 0.2)),
    "moon": (("One moon of {p} is {v}.", 0.5), ("{p} has a moon called {v}.", 0.3),
             ("In {p} the sky shows {v}.", 0.2)),
    "glossary": (("The word {w} means {v}.", 0.5), ("{w} means {v}.", 0.3),
                 ("In English, {w} is {v}.", 0.2)),
    "arithmetic": (("{a} + {b} = {s}.", 0.5), ("{a} plus {b} is {s}.", 0.3),
                   ("The sum of {a} and {b} is {s}.", 0.2)),
}  # fmt: skip
ATTRIBUTES = ("capital", "color", "ruler", "moon")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))


@dataclass
class World:
    facts: dict[str, dict[str, tuple[str, ...]]]  # planet -> attribute -> values, likeliest first
    glossary: dict[str, tuple[str, ...]]  # word -> its eight renderings, likeliest first
    train_pairs: list[tuple[int, int]]
    heldout_pairs: list[tuple[int, int]]

    @property
    def planets(self) -> list[str]:
        return sorted(self.facts)

    @property
    def words(self) -> list[str]:
        return sorted(self.glossary)

    def subset(self, planets: Sequence[str], words: Sequence[str]) -> World:
        return World({p: self.facts[p] for p in planets}, {w: self.glossary[w] for w in words},
                     self.train_pairs, self.heldout_pairs)  # fmt: skip

    def union(self, other: World) -> World:
        return World({**other.facts, **self.facts}, {**other.glossary, **self.glossary},
                     self.train_pairs, self.heldout_pairs)  # fmt: skip


def value_probs(n: int) -> tuple[float, ...]:
    """Probabilities of an item's ``n`` values, likeliest first: ``p_i = (n - i) / sum_j j``."""
    total = n * (n + 1) / 2
    return tuple((n - i) / total for i in range(n))


def make_world(seed: int, n_planets: int = 16, n_words: int = 48) -> World:
    rng = random.Random(seed)
    n_moons = N_VALUES["moon"]
    names: set[str] = set()
    while len(names) < n_planets * (3 + n_moons) + n_words:
        names.add(_word(rng, rng.choice([2, 3])))
    pool = sorted(names)
    rng.shuffle(pool)
    cap = [c.capitalize() for c in pool[: (3 + n_moons) * n_planets]]
    planets, cities, rulers = cap[:n_planets], cap[n_planets : 2 * n_planets], cap[2 * n_planets : 3 * n_planets]  # fmt: skip
    moons = cap[3 * n_planets :]
    facts = {
        p: {
            "capital": (cities[i],),
            "color": tuple(rng.sample(_COLORS, N_VALUES["color"])),
            "ruler": (rulers[i],),
            "moon": tuple(moons[n_moons * i : n_moons * (i + 1)]),
        }
        for i, p in enumerate(planets)
    }
    glossary = {}
    for w in pool[(3 + n_moons) * n_planets :]:
        # the word's own renderings, in its own order of likelihood
        glossary[w] = tuple(rng.sample(_MEANINGS, N_VALUES["glossary"]))
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    return World(
        facts=facts, glossary=glossary, train_pairs=pairs[:-500], heldout_pairs=pairs[-500:]
    )


def _pick(rng: random.Random, options: Sequence, weights: Sequence[float]):
    return rng.choices(options, weights)[0]


def answer(kind: str, rng: random.Random, **fields) -> str:
    """One sample of an answer of ``kind`` (``v`` may be a tuple of values: sampled too)."""
    forms, probs = zip(*_A[kind], strict=True)
    if isinstance(fields.get("v"), tuple):
        vals = fields["v"]
        fields["v"] = _pick(rng, vals, value_probs(len(vals)))
    return _pick(rng, forms, probs).format(**fields)


def qa(
    world: World, skill: str, rng: random.Random, heldout: bool
) -> tuple[str, str, tuple[str, ...]]:
    """One (question, sampled answer, every right value) of ``skill``; ``heldout`` draws the
    number pairs that training never sees."""
    if skill == "facts":
        planet = rng.choice(world.planets)
        attr = rng.choice(ATTRIBUTES)
        q = rng.choice(_Q[attr]).format(p=planet)
        vals = world.facts[planet][attr]
        return q, answer(attr, rng, p=planet, v=vals), vals
    if skill == "glossary":
        w = rng.choice(world.words)
        q = rng.choice(_Q["glossary"]).format(w=w)
        return q, answer("glossary", rng, w=w, v=world.glossary[w]), world.glossary[w]
    if skill == "arithmetic":
        a, b = rng.choice(world.heldout_pairs if heldout else world.train_pairs)
        q = "What is {a} + {b}?" if rng.random() < 0.5 else "Compute {a} plus {b}."
        return q.format(a=a, b=b), answer("arithmetic", rng, a=a, b=b, s=a + b), (str(a + b),)
    raise ValueError(f"unknown skill {skill!r}")


def conversation(world: World, rng: random.Random, mix: dict[str, float]) -> dict:
    """One training conversation (a quarter two-turn, a tenth with a system prompt), skills
    drawn with weights ``mix``; ``answers``: every right value of its last question."""
    skills = [s for s in SKILLS if mix.get(s, 0) > 0]
    weights = [mix[s] for s in skills]
    skill = _pick(rng, skills, weights)
    msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.1 else []
    for turn in range(2 if rng.random() < 0.25 else 1):
        s = _pick(rng, skills, weights) if turn else skill
        q, a, vals = qa(world, s, rng, False)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"skill": skill, "messages": msgs, "answers": list(vals)}


def make_corpus(
    seed: int, n_train: int, n_heldout_per_skill: int, n_questions_per_skill: int = 0
) -> dict[str, list[dict]]:
    """The fusion corpus (``train``: ``n_train`` conversations, skills uniform), the same
    conversations with the right values of each last question (``prompts``: what implicit
    fusion's correctness check reads), the held-out set that training's curve reads
    (``heldout``: ``n_heldout_per_skill`` single-turn rows per skill) and the toy question set
    that evaluation reads (``questions``: ``n_questions_per_skill`` rows per skill); both fresh
    samples, each from its own draws."""
    world = make_world(seed)
    rng = random.Random(seed + 1)
    uniform = dict.fromkeys(SKILLS, 1.0)
    prompts = [conversation(world, rng, uniform) for _ in range(n_train)]
    out = {"train": [{"skill": r["skill"], "messages": r["messages"]} for r in prompts],
           "prompts": prompts}  # fmt: skip
    for split, n, tag in (
        ("heldout", n_heldout_per_skill, ""),
        ("questions", n_questions_per_skill, "questions-"),
    ):
        out[split] = []
        for skill in SKILLS:
            hrng = random.Random(f"{seed}-{tag}{skill}")
            for _ in range(n):
                q, a, vals = qa(world, skill, hrng, True)
                out[split].append(
                    {
                        "skill": skill,
                        "reference": a,
                        "answers": list(vals),
                        "messages": [
                            {"role": "user", "content": q},
                            {"role": "assistant", "content": a},
                        ],
                    }
                )
    return out
