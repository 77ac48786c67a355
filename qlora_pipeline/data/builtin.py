"""Deterministic synthetic tasks, generated from a seed so no download is ever needed.

Each generator returns canonical records {prompt, completion} (plus `choices` and `label` for
classification); fetching turns them into the task's prompt format.
"""

from __future__ import annotations

import math
import random

from ..core.errors import InputError


# Integer addition/subtraction with an exact answer: the QLoRA literature warns that 4-bit
# quantization hurts numerical reasoning, so this is where quantization error shows.
def arithmetic(num_examples: int, seed: int, min_operand: int = 10, max_operand: int = 99,
               operations: str = "+-") -> list[dict]:
    check_arithmetic(num_examples, min_operand, max_operand, operations)
    rng = random.Random(seed)
    # By problem: every problem once, so no test problem is also a training problem.
    records: dict[tuple[int, str, int], dict] = {}
    while len(records) < num_examples:
        a, b = rng.randint(min_operand, max_operand), rng.randint(min_operand, max_operand)
        op = rng.choice(operations)
        problem = {"prompt": f"What is {a} {op} {b}? Answer with the number only.",
                   "completion": str(a + b if op == "+" else a - b)}
        records.setdefault((a, op, b), problem)  # a problem drawn again is skipped
    return list(records.values())


def check_arithmetic(num_examples: int, min_operand: int = 10, max_operand: int = 99,
                     operations: str = "+-") -> None:
    if min_operand > max_operand:
        raise InputError(f"dataset.options: found min_operand {min_operand} above max_operand "
                         f"{max_operand}; expected min_operand <= max_operand")
    distinct = (max_operand - min_operand + 1) ** 2 * len(set(operations))
    if num_examples > distinct:
        raise InputError(
            f"dataset.num_examples: found {num_examples}, but operands {min_operand}..{max_operand}"
            f" with '{operations}' make only {distinct} distinct problems; expected at most "
            f"{distinct}, or a wider operand range")


TOPICS = {
    "sports": (
        ["The striker", "Our goalkeeper", "The home team", "The young sprinter", "The coach",
         "The tennis champion", "The rugby captain", "The cycling squad"],
        ["celebrated", "trained hard for", "lost", "dominated", "prepared for", "qualified for"],
        ["the league final", "the penalty shootout", "the marathon", "the second half",
         "the championship match", "the relay race", "the away game", "the derby"],
    ),
    "food": (
        ["The chef", "My grandmother", "The bakery", "The street vendor", "The restaurant",
         "Our host", "The pastry cook", "The diner"],
        ["served", "seasoned", "baked", "tasted", "grilled", "prepared"],
        ["a spicy curry", "fresh sourdough bread", "the lemon tart", "a bowl of ramen",
         "roasted vegetables", "the chocolate cake", "garlic prawns", "a mushroom risotto"],
    ),
    "weather": (
        ["The forecast", "The storm", "A cold front", "The morning fog", "Heavy rain",
         "The heatwave", "Strong wind", "The thunderstorm"],
        ["covered", "hit", "moved across", "lingered over", "soaked", "swept through"],
        ["the coastal towns", "the valley", "the northern hills", "the airport",
         "the city centre", "the farmland", "the mountain pass", "the harbour"],
    ),
    "technology": (
        ["The new chip", "The software update", "The startup", "The laptop",
         "The cloud service", "The smartphone", "The database", "The robot"],
        ["crashed during", "sped up", "was redesigned for", "automated", "encrypted",
         "was benchmarked on"],
        ["the compiler", "the data centre", "the network upload", "the battery test",
         "the operating system", "the image recognition", "the server cluster",
         "the app store"],
    ),
}


def topic(num_examples: int, seed: int) -> list[dict]:
    """Four-way topic classification of a templated sentence (a multiple-choice task)."""
    rng = random.Random(seed)
    labels = list(TOPICS)
    records = []
    for _ in range(num_examples):
        label = rng.choice(labels)
        subjects, verbs, objects = TOPICS[label]
        sentence = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
        prompt = (f"Classify the topic of the sentence as one of: {', '.join(labels)}.\n"
                  f"Sentence: {sentence}\nAnswer with the topic only.")
        records.append({"prompt": prompt, "completion": label, "choices": labels,
                        "label": labels.index(label)})
    return records


# Sums of number lists whose length is log-uniform between 1 and 100: with SmolLM2's
# tokenizer (digits split) and a short system prompt, chat examples run from ~25 to ~430
# tokens, most of them short: padded batches waste much of their width (benchmarks/packing.py).
# No options: the task schema allows dataset.options for arithmetic only.
def list_sum(num_examples: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(num_examples):
        count = round(math.exp(rng.uniform(math.log(1), math.log(100))))
        numbers = [rng.randint(1, 99) for _ in range(count)]
        records.append({"prompt": f"Add up these numbers: {', '.join(map(str, numbers))}. "
                                  f"Answer with the number only.",
                        "completion": str(sum(numbers))})
    return records


GENERATORS = {"arithmetic": arithmetic, "topic": topic, "list_sum": list_sum}


def generate(name: str, num_examples: int, seed: int, options: dict | None = None) -> list[dict]:
    return GENERATORS[name](num_examples, seed, **(options or {}))
