"""Adapter arithmetic: a new LoRA adapter made from a weighted combination of others (peft's
`add_weighted_adapter`, with every combination type peft has and the same results).

Every LoRA layer kind (Linear, GPT-2 Conv1D, Embedding, Conv1d/2d) stores its update as two factors whose flattened
forms multiply to the update in one orientation, U = s * B A with B (out x r) and A (r x in·kernel) (for an
embedding: B (dim x r), A (r x vocab)). So all the arithmetic here works on plain matrices and never needs to know
the layer kind. There are three families of combinations:

- `cat`: stack the factors, A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B' = [B_1 B_2 ...]. Exact (B'A' = sum w_i U_i), at
  rank sum r_i.
- `svd` and `<rule>_svd`: apply the rule to the full updates U_i, then keep the best rank-k approximation of the
  result (truncated SVD, Eckart-Young). Accurate, at a rank you choose.
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: apply the rule to the A's and to the B's
  separately, each weighted by sqrt(|w_i s_i|) (the sign on A), at the adapters' common rank. Cheap, but B'A' has
  cross terms B_i A_j, so it only approximates sum w_i U_i (peft documents `linear` as "a very rough
  approximation"); the report below measures how rough.

The rules (applied to a list of same-shaped tensors and their weights):
- `linear` (task arithmetic): sum w_i t_i.
- `magnitude_prune`: keep the `density` fraction of largest-magnitude entries of each t_i, then sum w_i t_i.
- `ties` (Yadav et al. 2023, "TIES-Merging"): trim as above; elect a sign per entry (of the sum of the trimmed
  tensors, or of the count of signs with majority_sign_method="frequency"); average the weighted entries that agree
  with it.
- `dare_linear` / `dare_ties` (Yu et al. 2023, "Language Models are Super Mario"): drop each entry with probability
  1 - density and rescale the survivors by 1 / density (so the expectation is unchanged), then sum or TIES-merge.

Beyond peft, `add_weighted_adapter` returns a `CombinationReport`: the new adapter's rank and, for each layer, the
relative error of the result against the update it stands for (cat and linear: sum w_i U_i; the svd kinds: the rule
applied to the full updates), so a too-small `svd_rank` or a rough `linear` combination shows as a number.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from deltatune.errors import AdapterNotFoundError, ConfigError, MergeError
from deltatune.layer import ModulesToSave
from deltatune.methods.lora.layers import LoraEmbedding, LoraLayer

RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_KINDS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*RULES, "cat", *SVD_KINDS)
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # the rules that take `density`
SIGN_ELECTING = ("ties", "dare_ties")  # the rules that take `majority_sign_method`


# --- the rules, on lists of same-shaped tensors ----------------------------------------------------------------
def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim step: keep the int(density * n) entries of largest magnitude, zero the rest (small entries are
    mostly redundant and only add interference when tasks are merged)."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[tensor.abs().flatten().topk(keep).indices] = 1
    return tensor * mask.view_as(tensor)


def drop_and_rescale(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (a Bernoulli draw from torch's global generator, as peft
    draws it, so a seeded run gives peft's mask) and divide the survivors by `density`, which keeps the expected
    value of every entry, and so of the update, unchanged."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def elect_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' elect step: the sign (+1/-1) per entry that carries the most mass ("total": the sign of the sum) or the
    most tensors ("frequency"); a tie elects +1."""
    votes = stacked.sum(dim=0) if method == "total" else stacked.sign().sum(dim=0)
    return torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(weighted: torch.Tensor, agrees: torch.Tensor) -> torch.Tensor:
    """TIES' merge step: the mean over the tensors whose entry agrees with the elected sign (zeros never agree, so
    a trimmed entry does not dilute the mean)."""
    total = (weighted * agrees).sum(dim=0)
    return total / agrees.sum(dim=0).clamp(min=1)


def combine(
    rule: str,
    tensors: list[torch.Tensor],
    weights: list[float],
    density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """One of `RULES` applied to same-shaped tensors. The sign is elected on the unweighted (trimmed) tensors and
    the weights applied after, as peft does."""
    if rule in ("ties", "magnitude_prune"):
        tensors = [keep_largest(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [drop_and_rescale(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if rule in SIGN_ELECTING:
        agrees = stacked.sign() == elect_sign(stacked, majority_sign_method)
        return disjoint_mean(stacked * w, agrees)
    return (stacked * w).sum(dim=0)


# --- the three families, on one layer's factors --------------------------------------------------------------------
def split_weight(weight: float) -> tuple[float, float]:
    """The factors' shares of a weight: A gets sqrt(|w|) with w's sign, B gets sqrt(|w|), so B A scales by w."""
    root = math.sqrt(abs(weight))
    return math.copysign(root, weight), root


def combine_factors(rule: str, factors, weights, density, majority_sign_method):
    """Factor-level families: the rule on the A's, then on the B's (in this order: DARE's draws follow peft's)."""
    shares = [split_weight(w) for w in weights]
    a = combine(rule, [f[0] for f in factors], [s[0] for s in shares], density, majority_sign_method)
    b = combine(rule, [f[1] for f in factors], [s[1] for s in shares], density, majority_sign_method)
    return a, b


def concatenate(factors, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """`cat`: A' stacks the weighted A's (rows), B' the B's (columns); B'A' = sum w_i B_i A_i exactly."""
    a = torch.cat([f[0] * w for f, w in zip(factors, weights)], dim=0)
    b = torch.cat([f[1] for f in factors], dim=1)
    return a, b


def truncated_svd(
    update: torch.Tensor, rank: int, clamp: float | None, full_matrices: bool, driver: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors (A', B') of `update` (Eckart-Young): B' = U_k diag(S_k), A' = V_k^T. `clamp`
    (a quantile in (0, 1]) caps the entries of both factors at that quantile of all of them, as peft's option does."""
    if driver is not None and update.device.type != "cuda":
        raise ConfigError(
            f"svd_driver={driver!r} works on CUDA tensors only; leave it None on {update.device}."
        )
    u, s, vh = torch.linalg.svd(update, full_matrices=full_matrices, driver=driver)
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b


def relative_error(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> float:
    """||B'A' - target|| / ||target|| (Frobenius); 0 for a zero target matched exactly."""
    norm = torch.linalg.matrix_norm(target)
    diff = torch.linalg.matrix_norm(b @ a - target)
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / norm)


# --- the report ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LayerCombination:
    """One layer of the result: its rank and how far it is from the update it stands for (None for the
    factor-level pruning kinds, whose result is defined by the factors alone)."""

    module: str
    rank: int  # rows of the new factors this layer uses (at most the adapter's rank)
    relative_error: float | None


@dataclasses.dataclass
class CombinationReport:
    """What `add_weighted_adapter` built: the new adapter's rank and each layer's rank and relative error."""

    adapter_name: str
    combination_type: str
    rank: int
    layers: list[LayerCombination]

    @property
    def max_relative_error(self) -> float | None:
        errors = [layer.relative_error for layer in self.layers if layer.relative_error is not None]
        return max(errors) if errors else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "max_relative_error": self.max_relative_error}

    def __str__(self) -> str:
        error = self.max_relative_error
        shown = "n/a" if error is None else f"{error:.3g}"
        return (
            f"adapter {self.adapter_name!r} ({self.combination_type}): rank {self.rank}, {len(self.layers)} layers, "
            f"max relative error {shown}"
        )


# --- the model-level operation -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to combine, once the arguments are checked: the kind, the rule it applies, the new rank, the options."""

    kind: str
    rule: str
    rank: int
    density: float | None = None
    majority_sign_method: str = "total"
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None


def combine_layer(factors, scalings, weights, recipe: Recipe, transposed: bool = False):
    """The new factors (A', B') of one layer from its source adapters' flat factors, scalings and weights, and the
    update the result stands for (None for the factor-level pruning kinds, which have no other definition).

    The svd kinds apply their rule to the updates in the layout the base weight is stored in (`transposed` for an
    embedding table and GPT-2's Conv1D), as peft does, so a seeded DARE draw drops the same entries."""
    scaled = [w * s for w, s in zip(weights, scalings)]  # the scalings move into the factors (new scaling: 1)
    if recipe.kind in SVD_KINDS:
        updates = [(b @ a * s).T if transposed else b @ a * s for (a, b), s in zip(factors, scalings)]
        target = combine(recipe.rule, updates, weights, recipe.density, recipe.majority_sign_method)
        target = target.T if transposed else target
        options = (recipe.svd_clamp, recipe.svd_full_matrices, recipe.svd_driver)
        return (*truncated_svd(target, recipe.rank, *options), target)
    target = (
        combine("linear", [b @ a for a, b in factors], scaled) if recipe.kind in ("cat", "linear") else None
    )
    if recipe.kind == "cat":
        return (*concatenate(factors, scaled), target)
    if len({(a.shape, b.shape) for a, b in factors}) > 1:
        raise MergeError(
            f"{recipe.kind!r} combines the factors entry by entry, but the adapters have different ranks in this "
            "layer (rank_pattern); use 'cat' or an svd kind."
        )
    return (
        *combine_factors(recipe.rule, factors, scaled, recipe.density, recipe.majority_sign_method),
        target,
    )


def add_weighted_adapter(
    peft_model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> CombinationReport:
    """Add adapter `adapter_name` combining `adapters` with `weights` (see the module docstring). It is added
    inactive, like any new adapter (`set_adapter` to use it). All or nothing: on error the model is unchanged."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check_adapters(peft_model, adapters, weights, adapter_name)
    kind = combination_type
    _check_options(kind, svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method)
    if len(adapters) == 1 and _nothing_dropped(kind, density, svd_rank, svd_clamp):
        kind = "linear"  # peft's shortcut: with one adapter, linear is exact
    layers = _layers_holding(peft_model, adapters)
    rule = "linear" if kind == "svd" else kind.removesuffix("_svd")
    recipe = Recipe(
        kind,
        rule,
        _new_rank(layers, adapters, kind, svd_rank),
        density,
        majority_sign_method,
        svd_clamp,
        svd_full_matrices,
        svd_driver,
    )
    heads = _head_sources(peft_model, adapters)
    peft_model.add_adapter(adapter_name, _new_config(peft_model, adapters, layers, recipe.rank))
    try:
        _copy_heads(peft_model, adapter_name, heads)
        rows = [
            _fill_layer(key, layer, dict(zip(adapters, weights)), adapter_name, recipe)
            for key, layer in layers.items()
        ]
    except Exception:
        peft_model.delete_adapter(adapter_name)
        raise
    return CombinationReport(adapter_name, kind, recipe.rank, rows)


@torch.no_grad()
def _fill_layer(key: str, layer: LoraLayer, weight_of: dict[str, float], adapter_name: str, recipe: Recipe):
    """Combine the source adapters this layer holds, write the new adapter's factors, and report on them."""
    present = [a for a in weight_of if a in layer.r]
    factors = [layer.flat_factors(a) for a in present]
    scalings = [layer.scaling[a] for a in present]
    transposed = isinstance(layer, LoraEmbedding) or layer.fan_in_fan_out
    a, b, target = combine_layer(factors, scalings, [weight_of[n] for n in present], recipe, transposed)
    layer.set_flat_factors(adapter_name, a, b)
    error = relative_error(a, b, target) if target is not None else None
    return LayerCombination(key, a.shape[0], error)


def _check_adapters(peft_model, adapters, weights, adapter_name) -> None:
    if not adapters:
        raise ConfigError("adapters is empty; name the adapters to combine.")
    if len(weights) != len(adapters):
        raise ConfigError(f"Got {len(weights)} weights for {len(adapters)} adapters; give one weight each.")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights}.")
    if len(set(adapters)) != len(adapters):
        raise ConfigError(f"adapters names an adapter twice ({adapters}); give each once with its weight.")
    unknown = [a for a in adapters if a not in peft_model.peft_config]
    if unknown:
        raise AdapterNotFoundError(
            f"No adapter named {unknown[0]!r}; this model has: {', '.join(peft_model.peft_config)}."
        )
    if adapter_name in peft_model.peft_config:
        raise ConfigError(
            f"An adapter named {adapter_name!r} already exists; pick a new name for the combination."
        )
    for name in adapters:
        config = peft_model.peft_config[name]
        if config.peft_type != "LORA":
            raise ConfigError(
                f"add_weighted_adapter combines LoRA adapters; {name!r} is a {config.peft_type} adapter."
            )
        if config.use_dora:
            raise MergeError(
                f"Adapter {name!r} is a DoRA adapter: its per-row magnitude rescales the whole weight, so it does "
                "not combine by adding updates. Combine plain LoRA adapters, or merge DoRA ones into the weights."
            )


def _check_options(kind, svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, sign_method) -> None:
    """Every option given must be one the combination type uses: an option accepted and ignored would be a silent
    error."""
    if kind not in COMBINATION_TYPES:
        raise ConfigError(f"Unknown combination_type {kind!r}; use one of: {', '.join(COMBINATION_TYPES)}.")
    rule = kind.removesuffix("_svd")
    if rule in PRUNING:
        if density is None or isinstance(density, bool) or not 0 < density <= 1:
            raise ConfigError(
                f"{kind!r} needs density, the fraction of entries kept, in (0, 1]; got {density!r}."
            )
    elif density is not None:
        raise ConfigError(
            f"density is used by the pruning kinds ({', '.join(PRUNING)} and their _svd forms), not {kind!r}."
        )
    if sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}.")
    if sign_method != "total" and rule not in SIGN_ELECTING:
        raise ConfigError(f"majority_sign_method is used by the ties kinds only, not by {kind!r}.")
    if kind in SVD_KINDS:
        if svd_rank is not None and (
            isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1
        ):
            raise ConfigError(f"svd_rank must be a positive integer, got {svd_rank!r}.")
        if svd_clamp is not None and not 0 < svd_clamp <= 1:
            raise ConfigError(f"svd_clamp is a quantile in (0, 1], got {svd_clamp!r}.")
        return
    given = {"svd_rank": svd_rank, "svd_clamp": svd_clamp, "svd_driver": svd_driver}
    used = [k for k, v in given.items() if v is not None] + (
        [] if svd_full_matrices else ["svd_full_matrices"]
    )
    if used:
        raise ConfigError(f"{', '.join(used)} apply to the svd kinds only, not {kind!r}.")


def _nothing_dropped(kind, density, svd_rank, svd_clamp) -> bool:
    """Whether the kind, on a single adapter, gives that adapter's update exactly: then peft uses `linear`, and so
    do we. A pruning density, an svd_rank or a clamp are honoured instead (peft ignores them with one adapter)."""
    if density is not None and density < 1:
        return False
    return kind not in SVD_KINDS or (svd_rank is None and svd_clamp is None)


def _layers_holding(peft_model, adapters) -> dict[str, LoraLayer]:
    """The LoRA layers that hold at least one of `adapters`, in model order (DARE draws in this order, as peft)."""
    layers = {
        key: module
        for key, module in peft_model.get_base_model().named_modules()
        if isinstance(module, LoraLayer) and any(a in module.r for a in adapters)
    }
    if not layers:
        raise MergeError(f"No layer holds any of {adapters}.")
    return layers


def _new_rank(layers, adapters, kind, svd_rank) -> int:
    """The new adapter's rank, by peft's rule: cat adds the ranks, the svd kinds keep svd_rank or the largest, the
    factor-level kinds need one common rank."""
    ranks = [max(layer.r[a] for layer in layers.values() if a in layer.r) for a in adapters]
    if kind == "cat":
        return sum(ranks)
    if kind in SVD_KINDS:
        return svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        raise MergeError(
            f"{kind!r} combines the factors entry by entry, so every adapter needs the same rank; got "
            f"{dict(zip(adapters, ranks))}. Use 'cat' or an svd kind."
        )
    return ranks[0]


def _new_config(peft_model, adapters, layers, rank):
    """The first adapter's config with the new rank and scaling 1 (lora_alpha = r, no rsLoRA: weights and scalings
    are in the factors already), targeting exactly the layers that hold a source adapter, with every source's
    trained modules."""
    configs = [peft_model.peft_config[a] for a in adapters]
    heads = sorted({m for c in configs for m in (c.modules_to_save or [])})
    # The initial factors are overwritten; keep the first config's init (so a seeded DARE run draws what peft's
    # does), but never PiSSA/OLoRA, whose init would rewrite the base weights.
    init = configs[0].init_lora_weights
    init = True if init in ("pissa", "olora") else init
    return dataclasses.replace(
        configs[0],
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights=init,
        target_modules=list(layers),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=heads or None,
        inference_mode=all(c.inference_mode for c in configs),
    )


def _head_sources(peft_model, adapters) -> dict[str, str]:
    """For each trained module (modules_to_save), the one source adapter whose copy the new adapter takes. Two
    sources with their own copies of one module cannot be combined (peft refuses this too)."""
    sources = {}
    for key, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, ModulesToSave):
            continue
        holders = [a for a in adapters if a in module.modules_to_save]
        if len(holders) > 1:
            raise MergeError(
                f"Adapters {holders} each train their own copy of {key} (modules_to_save); those copies cannot be "
                "combined. Combine adapters where at most one trains each module."
            )
        if holders:
            sources[key] = holders[0]
    return sources


@torch.no_grad()
def _copy_heads(peft_model, adapter_name, sources: dict[str, str]) -> None:
    model = peft_model.get_base_model()
    for key, source in sources.items():
        wrapper = model.get_submodule(key)
        if adapter_name not in wrapper.modules_to_save:
            wrapper.add(adapter_name)
        wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())
