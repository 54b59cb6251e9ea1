"""The mutation score of the core, per file, from the results `mutmut run` left in mutants/ (see docs/mutation.md).

Score = killed / (mutants checked - equivalent mutants excluded). A mutant mutmut ran no test for ("no tests")
counts as a survivor: no test would notice it. Timeouts are listed apart and not counted as kills.
Run by `make mutation` after `mutmut run`; `python bench/mutation_score.py --survivors` lists what lived.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# Mutants that change nothing observable, each with the reason (docs/mutation.md explains the list).
EQUIVALENT: dict[str, str] = {
    "deltatune.layer.xǁModulesToSaveǁ_forward_rows__mutmut_25": "torch.tensor(list of ints, dtype=None) is int64",
    "deltatune.layer.xǁModulesToSaveǁ_forward_rows__mutmut_28": "dtype dropped: a list of ints gives int64 anyway",
    "deltatune.methods.lora.layers.xǁLoraConvǁcreate_factors__mutmut_21": "torch's Conv treats bias=None as False",
    "deltatune.methods.lora.layers.xǁLoraConvǁcreate_factors__mutmut_35": "torch's Conv treats bias=None as False",
    "deltatune.methods.lora.layers.xǁLoraConvǁcreate_factors__mutmut_38": "stride 1 dropped: Conv's default is 1",
    "deltatune.methods.lora.layers.xǁLoraConvǁcreate_factors__mutmut_39": "stride 1 dropped: Conv's default is 1",
    "deltatune.methods.lora.fused.xǁLoraLinearFunctionǁbackward__mutmut_17": (
        "`or True` computes g_xa when neither x nor A needs a gradient; it is then unused (only wasted work)"
    ),
    "deltatune.methods.lora.arithmetic.x_combine_layer__mutmut_48": (
        'combine("LINEAR", ...) falls through to the weighted sum, which is what "linear" computes'
    ),
    "deltatune.methods.lora.dora.x_merged_weight__mutmut_5": "norm(p=None, dim=1) is the 2-norm over dim 1",
    "deltatune.methods.lora.arithmetic.x_keep_largest__mutmut_1": (
        "`density > 1`: at density 1, topk of every entry keeps them all, which is the early return's result"
    ),
    "deltatune.checkpoint.x_read_adapter_file__mutmut_18": 'load_file(device=None): its default device is "cpu"',
    "deltatune.layer.x_at_least_float32__mutmut_3": "`<= 32`: .float() of a float32 tensor is that tensor",
    "deltatune.checkpoint.x_write_adapter_file__mutmut_14": (
        "the temporary file's name: renamed on success, removed on failure, never seen after the call"
    ),
    "deltatune.checkpoint.x_write_adapter_file__mutmut_15": (
        "the temporary file's name: renamed on success, removed on failure, never seen after the call"
    ),
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped"}
STATUS.update({c: "timeout" for c in (36, -24, 24, 152, 255)})


def results(root: Path = Path("mutants")) -> dict[str, dict[str, str]]:
    """file -> mutant name -> status, for every file mutmut mutated; unchecked mutants are 'not checked'."""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        file = str(meta.relative_to(root)).removesuffix(".meta")
        out[file] = {
            k: ("not checked" if c is None else STATUS.get(c, "suspicious")) for k, c in codes.items()
        }
    return out


def main() -> None:
    rows, total = [], Counter()
    for file, statuses in results().items():
        counts = Counter(s for k, s in statuses.items() if k not in EQUIVALENT)
        counts["equivalent"] = sum(k in EQUIVALENT for k in statuses)
        total.update(counts)
        rows.append((file, counts))
    print(
        f"{'file':45} {'mutants':>7} {'killed':>6} {'lived':>5} {'timeout':>7} {'equiv':>5} {'unrun':>5} score"
    )
    for file, c in [*rows, ("total", total)]:
        checked = c["killed"] + c["survived"] + c["no tests"] + c["timeout"] + c["suspicious"]
        score = f"{100 * c['killed'] / checked:.1f}%" if checked else "-"
        print(
            f"{file:45} {sum(c.values()):7} {c['killed']:6} {c['survived'] + c['no tests']:5} {c['timeout']:7} "
            f"{c['equivalent']:5} {c['not checked']:5} {score}"
        )
    if "--survivors" in sys.argv:
        for statuses in results().values():
            for key, status in statuses.items():
                if status in ("survived", "no tests", "suspicious") and key not in EQUIVALENT:
                    print(status, key)


if __name__ == "__main__":
    main()
