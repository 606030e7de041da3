"""The built-in dataset: deterministic, vectorized, with signal in text, order and co-occurrence.

Generative story (every step vectorized over the flat array of interactions, no Python loop over
users or events, so 10M interactions take seconds):

- Items belong to latent topics. Each topic has a vocabulary of real English words, and an item's
  text (title + category) is drawn from its topic's words: text carries the topic.
- Inside a topic, items form a chain (a series, a course, accessories of one product). Item
  popularity inside a topic follows a power law (Zipf).
- Each user has three favourite topics with Dirichlet weights (topics themselves are Zipf-popular).
  A user's history is a sequence of phases; at each step the user moves to a new phase with
  probability `topic_switch_prob` and its topic is drawn from the favourites (or, one phase in
  five, from all topics by popularity): users drift between topics over time, and items of one
  topic co-occur.
- Within a phase, with probability `successor_prob` the next item is the successor of the previous
  one in the topic chain (order signal); otherwise it is drawn by popularity from the topic.
- Timestamps are per-user increasing (exponential gaps); ratings (`weight`, 1..5) are higher for a
  user's main topic. Repeated (user, item) pairs keep their first occurrence.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from components.config import SyntheticConfig

# One vocabulary per theme. Themes beyond these reuse vocabularies with a numbered variant, so
# their texts stay distinguishable by the variant word.
THEMES: dict[str, list[str]] = {
    "astronomy": "telescope galaxy nebula orbit comet planet stellar lunar eclipse meteor cosmos observatory zenith quasar solar".split(),
    "cooking": "skillet recipe spice oven baking pastry saucepan grill herb kitchen flavor simmer dough roast knife".split(),
    "gardening": "seed soil compost trowel bloom orchard greenhouse pruning shears mulch tulip fern hedge watering rose".split(),
    "cycling": "bicycle pedal saddle helmet derailleur chain spoke wheel tire handlebar gear sprint trail cadence brake".split(),
    "photography": "camera lens aperture shutter tripod flash portrait exposure zoom sensor film focus studio filter lighting".split(),
    "chemistry": "beaker reagent titration molecule solvent catalyst flask pipette acid compound polymer crystal distillation lab ion".split(),
    "music": "guitar violin melody chord piano rhythm drum amplifier string concert harmony tempo orchestra vinyl ballad".split(),
    "fishing": "rod reel lure tackle bait angler hook trout bass line fly bobber net kayak river".split(),
    "woodworking": "chisel lumber plank sander lathe dovetail clamp varnish oak router carving joinery workbench saw maple".split(),
    "fitness": "dumbbell treadmill yoga kettlebell workout protein stretch cardio barbell endurance squat mat interval trainer pulse".split(),
    "travel": "suitcase passport backpack itinerary hostel luggage voyage map souvenir cruise airport journey compass guide adventure".split(),
    "electronics": "circuit resistor capacitor soldering voltage transistor oscilloscope breadboard diode microcontroller battery sensor wire relay multimeter".split(),
    "painting": "canvas brush easel watercolor acrylic palette pigment sketch portrait landscape oil gallery fresco charcoal mural".split(),
    "camping": "tent lantern sleeping bag campfire hiking stove canteen hammock trail wilderness firewood cooler map knife".split(),
    "coffee": "espresso grinder roast barista latte bean brew kettle filter mug crema aroma arabica pourover cafe".split(),
    "gaming": "console controller joystick arcade quest dungeon pixel strategy multiplayer level boss puzzle racing cartridge tournament".split(),
    "pets": "leash kennel collar aquarium treat puppy kitten grooming litter feeder parrot hamster chew toy bowl".split(),
    "sailing": "sail mast anchor hull rudder keel harbor regatta compass nautical rope tide yacht buoy deck".split(),
    "history": "empire medieval dynasty archive manuscript castle revolution pharaoh chronicle antique relic battle kingdom ancient scroll".split(),
    "knitting": "yarn needle wool stitch pattern scarf sweater crochet skein cardigan loom cashmere mitten quilt thread".split(),
    "skiing": "ski slope snowboard goggles powder lift alpine binding glove chalet avalanche resort mogul pole parka".split(),
    "medicine": "stethoscope syringe bandage clinic vaccine thermometer diagnosis surgery pharmacy tablet dosage nurse therapy scalpel pulse".split(),
    "architecture": "blueprint facade column arch skyscraper concrete atrium dome beam cathedral bridge tower brick vault pavilion".split(),
    "robotics": "servo actuator gripper lidar motor arduino autonomous drone gyroscope encoder firmware kinematics chassis sensor controller".split(),
}
OVERSAMPLE = 2.0
EXPLORE_PROB = 0.2
ADJECTIVES = (
    "classic deluxe compact portable premium vintage modern essential advanced beginner "
    "professional lightweight heavy-duty complete ultimate"
).split()


def generate(cfg: SyntheticConfig, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Generate `(interactions, items)` in the RecForge schema.

    Deterministic for a given config and seed. Each user's history is drawn longer than its
    target length, repeated (user, item) pairs are dropped, and the history is cut back to the
    target, so `n_interactions` is met closely (short only for users who exhaust their topics).
    """
    for name in ("n_users", "n_items", "n_interactions", "n_topics"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"data.synthetic.{name} must be positive")
    if cfg.n_topics > cfg.n_items:
        raise ValueError("data.synthetic.n_topics cannot exceed n_items")
    for name in ("topic_switch_prob", "successor_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"data.synthetic.{name} must be in [0, 1]")

    rng = np.random.default_rng(seed)
    n_users, n_items, n_topics = cfg.n_users, cfg.n_items, cfg.n_topics

    # ---- items: topic, chain position, popularity --------------------------------------
    item_topic = rng.permutation(np.arange(n_items) % n_topics)
    # Sorting items by topic gives each topic a contiguous block; the order inside the block
    # (random) is the topic's chain.
    chain = np.lexsort((rng.random(n_items), item_topic))  # chain[k] = item at block position k
    topic_sizes = np.bincount(item_topic, minlength=n_topics)
    topic_start = np.concatenate(([0], np.cumsum(topic_sizes)[:-1]))
    block_pos = np.empty(n_items, dtype=np.int64)
    block_pos[chain] = np.arange(n_items)
    pos_in_topic = block_pos - topic_start[item_topic]

    # Popularity rank inside a topic is independent of chain position.
    pop_rank = np.empty(n_items, dtype=np.int64)
    for_rank = np.lexsort((rng.random(n_items), item_topic))
    pop_rank[for_rank] = np.arange(n_items) - topic_start[item_topic[for_rank]]
    weight_in_topic = 1.0 / (pop_rank + 1.0) ** cfg.popularity_exponent
    # Cumulative weights laid out in chain order, normalised per topic, for inverse-CDF draws.
    w_chain = weight_in_topic[chain]
    cum = np.cumsum(w_chain)
    topic_cum_end = cum[topic_start + topic_sizes - 1]
    topic_cum_start = topic_cum_end - np.add.reduceat(w_chain, topic_start)

    # ---- users: sequence lengths and favourite topics ----------------------------------
    raw_len = rng.lognormal(mean=0.0, sigma=0.9, size=n_users)
    target_len = np.maximum(5, np.round(raw_len / raw_len.sum() * cfg.n_interactions)).astype(np.int64)
    # Oversample so that dropping repeats still leaves the target length.
    lengths = np.ceil(target_len * OVERSAMPLE).astype(np.int64)
    n = int(lengths.sum())
    user_start = np.concatenate(([0], np.cumsum(lengths)[:-1]))

    topic_pop = 1.0 / np.arange(1, n_topics + 1) ** 0.7
    topic_pop = topic_pop[rng.permutation(n_topics)]
    topic_pop /= topic_pop.sum()
    favourites = _favourite_topics(rng, n_users, topic_pop)
    fav_weights = rng.dirichlet(np.ones(3) * 0.7, size=n_users)
    fav_cum = np.cumsum(fav_weights, axis=1)

    # ---- events: phases, jumps and chain walks ----------------------------------------
    user = np.repeat(np.arange(n_users), lengths)
    idx = np.arange(n)
    first = np.zeros(n, dtype=bool)
    first[user_start] = True
    phase_start = first | (rng.random(n) < cfg.topic_switch_prob)
    phase_id = np.cumsum(phase_start) - 1
    phase_user = user[phase_start]
    choice = (rng.random(phase_user.size)[:, None] > fav_cum[phase_user]).sum(axis=1)
    phase_topic = favourites[phase_user, np.minimum(choice, 2)]
    # Some phases explore a topic outside the favourites, drawn by topic popularity.
    explore = rng.random(phase_user.size) < EXPLORE_PROB
    phase_topic[explore] = rng.choice(n_topics, size=int(explore.sum()), p=topic_pop)
    topic = phase_topic[phase_id]

    jump = phase_start | (rng.random(n) >= cfg.successor_prob)
    jump_id = np.cumsum(jump) - 1
    jump_idx = idx[jump]
    jump_topic = topic[jump]
    u = rng.random(jump_idx.size)
    target = topic_cum_start[jump_topic] + u * (topic_cum_end[jump_topic] - topic_cum_start[jump_topic])
    drawn = np.searchsorted(cum, target, side="right")
    # Guard the float edge: the draw must stay inside its topic's block.
    lo = topic_start[jump_topic]
    drawn = np.clip(drawn, lo, lo + topic_sizes[jump_topic] - 1)
    jump_pos = drawn - lo
    steps = idx - jump_idx[jump_id]
    pos = (jump_pos[jump_id] + steps) % topic_sizes[topic]
    items = chain[topic_start[topic] + pos]

    # ---- timestamps and ratings --------------------------------------------------------
    gaps = rng.exponential(cfg.mean_gap_seconds, size=n).astype(np.int64) + 1
    gaps[user_start] = 0
    csum = np.cumsum(gaps)
    offsets = rng.integers(0, 365 * 86400, size=n_users)
    timestamps = cfg.start_timestamp + offsets[user] + csum - csum[user_start][user]
    main_topic = favourites[np.arange(n_users), fav_weights.argmax(axis=1)]
    rating = 3.0 + (topic == main_topic[user]) + rng.normal(0.0, 0.8, size=n)
    rating = np.clip(np.round(rating), 1, 5)

    # First occurrence of each (user, item) wins (rows are in time order per user), then each
    # user is cut back to the target length.
    first_seen = pl.Series(user * np.int64(n_items) + items).is_first_distinct().to_numpy()
    kept_user = user[first_seen]
    kept_start = np.searchsorted(kept_user, np.arange(n_users))
    rank = np.arange(kept_user.size) - kept_start[kept_user]
    keep = np.flatnonzero(first_seen)[rank < target_len[kept_user]]

    user_ids = pl.Series("user_id", _ids("u", n_users))
    item_ids = pl.Series("item_id", _ids("i", n_items))
    interactions = pl.DataFrame(
        {
            "user_id": user_ids.gather(user[keep]),
            "item_id": item_ids.gather(items[keep]),
            "timestamp": timestamps[keep].astype(np.int64),
            "weight": rating[keep].astype(np.float64),
        }
    )
    items_df = pl.DataFrame(
        {
            "item_id": item_ids,
            "text": _item_texts(rng, item_topic, pos_in_topic, n_topics),
            "topic": item_topic.astype(np.int64),
        }
    )
    return interactions, items_df


def _favourite_topics(rng: np.random.Generator, n_users: int, topic_pop: np.ndarray) -> np.ndarray:
    """Three distinct favourite topics per user, drawn by topic popularity (Gumbel top-3)."""
    k = min(3, topic_pop.size)
    keys = np.log(topic_pop)[None, :] - np.log(-np.log(rng.random((n_users, topic_pop.size))))
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    if k < 3:  # fewer than three topics: repeat the last favourite
        top = np.concatenate([top, np.repeat(top[:, -1:], 3 - k, axis=1)], axis=1)
    return top


def _ids(prefix: str, count: int) -> list[str]:
    """Zero-padded string ids (`u0007`), built once per entity and gathered by index."""
    width = len(str(count - 1))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def _item_texts(
    rng: np.random.Generator, item_topic: np.ndarray, pos_in_topic: np.ndarray, n_topics: int
) -> list[str]:
    names = list(THEMES)
    texts = []
    # Per-item text needs string building; 1M items take a few seconds, and items are far
    # fewer than interactions in every configuration we generate.
    word_draws = rng.integers(0, 1 << 30, size=(item_topic.size, 3))
    adj_draws = rng.integers(0, len(ADJECTIVES), size=item_topic.size)
    for i in range(item_topic.size):
        t = int(item_topic[i])
        theme = names[t % len(names)]
        variant = t // len(names)
        vocab = THEMES[theme]
        w = word_draws[i] % len(vocab)
        words = [vocab[w[0]], vocab[w[1]], vocab[w[2]]]
        series = f"{theme} collection" + (f" {variant + 1}" if variant else "")
        texts.append(
            f"{ADJECTIVES[adj_draws[i]].capitalize()} {words[0]} {words[1]} with {words[2]}, "
            f"part {int(pos_in_topic[i]) + 1} of the {series}. Category: {theme}."
        )
    return texts
