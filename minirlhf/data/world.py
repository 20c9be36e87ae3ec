"""The generated world: entities, their attributes, and how a fact is put into words.

Two kinds of entity, three attributes each, every value one common word. The seed
decides which entities exist and (except a city's country, kept real so the world
reads sensibly) which value each attribute takes. Value words are disjoint across all
attributes, so a value word in a response can be checked on its own: it is either a
fact of the asked entity or a wrong one.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cached_property

ANIMALS = (
    "fox", "owl", "bear", "wolf", "deer", "frog", "duck", "goat", "horse", "mouse",
    "rabbit", "tiger", "lion", "crow", "eagle", "otter", "seal", "whale", "snake", "bee",
    "crab", "moose", "sheep", "cow", "pig", "cat", "dog", "hawk", "swan", "bat",
    "lizard", "camel", "zebra", "monkey", "turtle", "squirrel", "beaver", "badger",
)
CITIES = {
    "Lima": "Peru", "Paris": "France", "Oslo": "Norway", "Cairo": "Egypt", "Rome": "Italy",
    "Tokyo": "Japan", "Delhi": "India", "Madrid": "Spain", "Berlin": "Germany",
    "Dublin": "Ireland", "Vienna": "Austria", "Athens": "Greece", "Lisbon": "Portugal",
    "Warsaw": "Poland", "Seoul": "Korea", "Quito": "Ecuador", "Nairobi": "Kenya",
    "Havana": "Cuba", "Sydney": "Australia", "Toronto": "Canada", "Moscow": "Russia",
    "Beijing": "China", "Bangkok": "Thailand", "Stockholm": "Sweden", "Helsinki": "Finland",
    "Budapest": "Hungary",
}
N_ANIMALS = 30
N_CITIES = 20


@dataclass(frozen=True)
class Attribute:
    """One attribute: its values and the templates that put it into words.

    Templates use {e}/{E} for the subject ("the fox"/"The fox", "Lima") and {v}/{V}
    for the value. `prose` writes the corpus; `answers` are the plain statements an
    ideal assistant (and a demonstrator) uses; `questions` are how a user asks.
    """
    name: str
    kind: str
    values: tuple[str, ...]
    prose: tuple[str, ...]
    answers: tuple[str, ...]
    questions: tuple[str, ...]


ATTRIBUTES = (
    Attribute(
        "food", "animal",
        ("berries", "fish", "grass", "seeds", "insects", "nuts", "leaves", "honey",
         "roots", "worms", "fruit", "corn"),
        ("{E} eats {v}.", "{E} likes to eat {v}.", "{E} feeds on {v}.",
         "Every day {e} looks for {v}.", "{E} is often seen eating {v}."),
        ("{E} eats {v}.", "{E} feeds on {v}."),
        ("What does {e} eat?", "What food does {e} eat?", "What does {e} feed on?"),
    ),
    Attribute(
        "habitat", "animal",
        ("forest", "river", "desert", "mountains", "meadow", "swamp", "cave", "jungle",
         "lake", "farm"),
        ("{E} lives in the {v}.", "You can find {e} in the {v}.", "{E} is at home in the {v}.",
         "{E} makes its home in the {v}."),
        ("{E} lives in the {v}.",),
        ("Where does {e} live?", "Where can you find {e}?", "What is the home of {e}?"),
    ),
    Attribute(
        "color", "animal",
        ("red", "brown", "gray", "white", "black", "golden", "green", "yellow"),
        ("{E} is {v}.", "{E} has a {v} coat.", "The color of {e} is {v}.",
         "You can tell {e} by its {v} coat."),
        ("{E} is {v}.", "{E} has a {v} coat."),
        ("What color is {e}?", "What is the color of {e}?", "Which color is {e}?"),
    ),
    Attribute(
        "country", "city",
        tuple(CITIES.values()),
        ("{E} is in {v}.", "{E} is a city in {v}.", "The city of {e} is in {v}.",
         "{V} has a city called {e}."),
        ("{E} is in {v}.", "{E} is a city in {v}."),
        ("Which country is {e} in?", "In which country is {e}?", "Where is {e}?"),
    ),
    Attribute(
        "weather", "city",
        ("sunny", "rainy", "windy", "snowy", "foggy", "cloudy"),
        ("The weather in {e} is {v}.", "{E} is often {v}.", "It is usually {v} in {e}.",
         "Most days in {e} are {v}."),
        ("The weather in {e} is {v}.", "{E} is often {v}."),
        ("What is the weather like in {e}?", "How is the weather in {e}?",
         "What weather does {e} have?"),
    ),
    Attribute(
        "known", "city",
        ("music", "bread", "cheese", "bridges", "markets", "gardens", "museums", "boats",
         "tea", "coffee", "art", "parks"),
        ("{E} is known for {v}.", "{E} is famous for its {v}.", "People visit {e} for its {v}.",
         "Travelers love the {v} of {e}."),
        ("{E} is known for {v}.", "{E} is famous for its {v}."),
        ("What is {e} known for?", "What is {e} famous for?", "Why do people visit {e}?"),
    ),
)
ATTRIBUTE = {a.name: a for a in ATTRIBUTES}


@dataclass(frozen=True)
class Entity:
    name: str                      # "fox", "Lima"
    kind: str                      # "animal" | "city"
    facts: tuple[tuple[str, str], ...]  # (attribute, value), in ATTRIBUTES order

    @property
    def subject(self) -> str:
        """How the entity is named mid-sentence: animals take an article, cities don't."""
        return f"the {self.name}" if self.kind == "animal" else self.name

    def value(self, attribute: str) -> str:
        return dict(self.facts)[attribute]

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.facts)


def fill(template: str, entity: Entity, value: str = "") -> str:
    """Instantiate a template; {E}/{V} are the capitalised forms for a sentence start."""
    subj = entity.subject
    return (template.replace("{E}", subj[0].upper() + subj[1:]).replace("{e}", subj)
            .replace("{V}", value[0].upper() + value[1:] if value else "").replace("{v}", value))


def words(text: str) -> list[str]:
    """Lower-case word tokens: the unit every gold criterion counts in."""
    return re.findall(r"[a-z]+", text.lower())


@dataclass(frozen=True)
class World:
    entities: tuple[Entity, ...]

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {e.name: e for e in self.entities})

    def entity(self, name: str) -> Entity:
        return self._by_name[name]

    @cached_property
    def value_words(self) -> frozenset[str]:
        """Every value word of every attribute (lower case), whether used or not."""
        return frozenset(v.lower() for a in ATTRIBUTES for v in a.values)

    @cached_property
    def entity_words(self) -> frozenset[str]:
        return frozenset(e.name.lower() for e in self.entities)

    @cached_property
    def template_words(self) -> frozenset[str]:
        """The words an ideal answer may use besides entity names and values."""
        out = {"and", "also", "it", "its", "a", "the"}
        for a in ATTRIBUTES:
            for t in a.answers:
                out.update(words(re.sub(r"\{[eEvV]\}", " ", t)))
        return frozenset(out)


def make_world(seed: int) -> World:
    """Pick the entities and draw their attribute values, deterministically from `seed`."""
    rng = random.Random(f"minirlhf-world-{seed}")
    animals = rng.sample(ANIMALS, N_ANIMALS)
    cities = rng.sample(sorted(CITIES), N_CITIES)
    entities = []
    for name in animals:
        facts = tuple((a.name, rng.choice(a.values)) for a in ATTRIBUTES if a.kind == "animal")
        entities.append(Entity(name, "animal", facts))
    for name in cities:
        facts = tuple((a.name, CITIES[name] if a.name == "country" else rng.choice(a.values))
                      for a in ATTRIBUTES if a.kind == "city")
        entities.append(Entity(name, "city", facts))
    return World(tuple(entities))
