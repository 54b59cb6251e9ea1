"""Interaction logs with a known structure, for the rec tests: a working recommender must beat popularity on them.

Every item belongs to one genre, named by the first word of its text. Every user has a genre: most of their events
are items of it, rated 4-5; a few are other genres' items, rated 1-2. So the next liked item is (in text) like the
liked history, which popularity cannot know. Each genre also has cold items that only ever appear as some users'
last event (the test target): only a model that reads text can rank them.
"""

from __future__ import annotations

import itertools
import os
import random

from helpers.data import FILLER, WORDS

GENRES = WORDS[:6]


def rec_items(items_per_genre: int = 8, cold_per_genre: int = 2) -> list[dict]:
    pairs = list(itertools.combinations(FILLER, 2))
    random.Random(1).shuffle(pairs)
    rows = []
    for g, genre in enumerate(GENRES):
        for k in range(items_per_genre + cold_per_genre):
            a, b = pairs[g * (items_per_genre + cold_per_genre) + k]
            rows.append(
                {
                    "item_id": f"i{len(rows)}",
                    "title": f"{genre} {a} {b}",
                    "genre": genre,
                    "cold": k >= items_per_genre,
                }
            )
    return rows


def rec_events(
    users: int = 48,
    length: tuple[int, int] = (6, 10),
    seed: int = 0,
    cold_share: float = 0.5,
    disliked_last: float = 0.4,
) -> tuple[list[dict], list[tuple]]:
    """(items, events) with events as (user, item, rating, timestamp), in a shuffled file order."""
    rng = random.Random(seed)
    items = rec_items()
    by_genre = {g: [r for r in items if r["genre"] == g and not r["cold"]] for g in GENRES}
    cold = {g: [r for r in items if r["genre"] == g and r["cold"]] for g in GENRES}
    events = []
    for u in range(users):
        genre = GENRES[u % len(GENRES)]
        n = rng.randint(*length)
        liked = rng.sample(by_genre[genre], min(n, len(by_genre[genre])))
        others = [r for g in GENRES if g != genre for r in by_genre[g]]
        disliked = rng.sample(others, 2)
        sequence = [(r, rng.choice([4, 5])) for r in liked] + [(r, rng.choice([1, 2])) for r in disliked]
        rng.shuffle(sequence)
        last = rng.choice(cold[genre]) if rng.random() < cold_share else liked[-1]
        sequence = [(r, s) for r, s in sequence if r is not last] + [(last, 5)]
        if rng.random() < disliked_last:  # a preference test target the user dislikes
            sequence.append((rng.choice([r for r in others if r not in disliked]), rng.choice([1, 2])))
        start = 880_000_000 + rng.randrange(10**6)
        for t, (row, rating) in enumerate(sequence):
            events.append((f"u{u}", row["item_id"], rating, start + 1000 * t))
    rng.shuffle(events)
    return items, events


def write_rec_data(folder: str, seed: int = 0, **kwargs) -> tuple[str, str]:
    """MovieLens' u.data layout (tab-separated, no header) and an items.csv; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    items, events = rec_events(seed=seed, **kwargs)
    log = os.path.join(folder, "u.data")
    with open(log, "w") as fh:
        fh.writelines("\t".join(map(str, e)) + "\n" for e in events)
    item_file = os.path.join(folder, "items.csv")
    with open(item_file, "w") as fh:
        fh.write("item_id,title,genre\n")
        fh.writelines(f"{r['item_id']},{r['title']},{r['genre']}\n" for r in items)
    return log, item_file


def tiny_llama_answers_folder(path: str, seed: int = 0) -> str:
    """tiny_llama_folder's model with "Yes" and "No" in its vocabulary (the preference task's answers)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from helpers.data import tiny_llama_folder

    tiny_llama_folder(path, seed)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["Yes", "No"])
    model = LlamaForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
