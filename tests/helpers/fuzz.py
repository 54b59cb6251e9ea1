"""What the fuzz tests share: hypothesis settings, JSON-ish values that break naive code, and the one property
every fuzzed call must hold (it succeeds, or raises one of deltatune's own errors with a message).

`make test` runs a small fixed sample (derandomized: the same inputs every run, seconds per test). To explore,
run with fresh random inputs and as many examples as you like:

    DELTATUNE_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz_files.py tests/test_fuzz_server.py
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from deltatune.errors import DeltatuneError

EXPLORE = int(os.environ.get("DELTATUNE_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int) -> settings:
    """`examples` fixed inputs in `make test`; DELTATUNE_FUZZ_EXAMPLES fresh random ones when exploring."""
    return settings(
        max_examples=EXPLORE or examples,
        derandomize=not EXPLORE,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# Values that typed code trips on: wrong types, edge numbers, NaN, broken regexes, odd strings.
NASTY = st.sampled_from(
    [
        True,
        False,
        None,
        0,
        -1,
        1,
        2**63,
        1e308,
        -1e-9,
        float("nan"),
        float("inf"),
        "",
        "16",
        "0.1",
        "((",
        "[",
        ".*",
        "all-linear",
        "none",
        [],
        {},
        [3],
        [-1],
        ["q_proj", 3],
        ["nope"],
        ["lm_head"],
        {"q_proj": 0},
        {"(": 1},
        {"q_proj": [True, False]},
        "LORA",
        "CAUSAL_LM",
        "SEQ_CLS",
        "\x00",
        "é" * 3,
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
VALUES = NASTY | JSON


def own_error_or_result(call):
    """Run `call`: return (result, None), or (None, error) for one of deltatune's errors, which must say something.
    Any other exception propagates and fails the test (hypothesis then shrinks the input)."""
    try:
        return call(), None
    except DeltatuneError as err:
        assert str(err).strip(), f"{type(err).__name__} raised without a message"
        return None, err
