"""AdaLoRA (Zhang et al. 2023): LoRA whose rank budget is shared out across layers while training.

Each targeted weight gets an update in SVD form, dW = P diag(lambda) Q * alpha / ranknum, stored as peft stores it:
`lora_A` = Q (r x in), `lora_E` = lambda (r x 1), `lora_B` = P (out x r); `ranknum` is the initial rank (not saved).
An orthogonality penalty ||P^T P - I||_F + ||Q Q^T - I||_F (averaged over matrices, times `orth_reg_weight`) keeps
P and Q near-orthogonal so that lambda behaves like singular values; it is added to the model's loss in `forward`.

After every optimizer step `on_optimizer_step` (called by the trainer; see `PeftModel.on_optimizer_step`) scores each
triplet (P[:, i], lambda_i, Q[i]) by sensitivity |w * grad| smoothed with an EMA (beta1) times its uncertainty (an EMA,
beta2, of how far the sensitivity strays from its average), and zeroes the lambda of the least important triplets so
that the total kept rank follows a cubic schedule: `init_r` per matrix until `tinit`, falling to `target_r` per matrix
at `total_step - tfinal`, then fixed. The kept ranks are recorded in `config.rank_pattern` ({"<module>.lora_E":
[kept?...]}); `save_pretrained` writes only the kept rows/columns, and loading builds layers with those ranks.

The rank allocator needs the gradients of the step: the hook must run after `optimizer.step()` and before
`optimizer.zero_grad()` (deltatune's trainer does this, passing the 0-based index of the step just taken, like peft's
`update_and_allocate` loops). The final allocation happens at step `total_step - tfinal`; with tfinal=0 and 0-based
steps that step never comes, exactly as in peft, so use tfinal >= 1 to be sure the budget reaches target_r.
A config that already holds a `rank_pattern` (a trained adapter) builds the pruned ranks directly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.checkpoint import PREFIX
from deltatune.config import Regex
from deltatune.errors import ConfigError, UnsupportedModelError
from deltatune.inject import find_targets, is_linear, replace_module
from deltatune.layer import at_least_float32
from deltatune.method import Method, Variant
from deltatune.methods.lora import LoraConfig, LoraLayer
from deltatune.quant import is_quantized

_EPS = 1e-5  # peft adds this to ranknum before dividing


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA options, named as in the `peft` package (`r` is ignored: the initial rank is `init_r`)."""

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[Regex, list[bool]] | None = None

    def __post_init__(self) -> None:
        if self.init_lora_weights not in (True, False):
            raise ConfigError(
                f"AdaLoRA's init_lora_weights must be True or False, got {self.init_lora_weights!r}."
            )
        super().__post_init__()
        self.peft_type = "ADALORA"
        if self.use_dora:
            raise ConfigError("AdaLoRA does not support DoRA; set use_dora=False (or use LoraConfig).")
        if self.r != 8:
            warnings.warn("AdaLoRA ignores `r`; the initial rank is `init_r`.", stacklevel=3)
        if self.use_rslora or self.alpha_pattern:
            warnings.warn("AdaLoRA ignores use_rslora and alpha_pattern (as peft does).", stacklevel=3)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("layers_to_transform cannot be used when target_modules is a regex string.")
        self._check_schedule()

    def _check_rank_pattern(self) -> None:
        """A trained adapter's kept-rank masks: one boolean per initial rank (init_r of them)."""
        bad = {k: len(v) for k, v in (self.rank_pattern or {}).items() if len(v) != self.init_r}
        if bad:
            raise ConfigError(
                f"rank_pattern masks must hold init_r={self.init_r} booleans each; these do not: {bad}. "
                "The adapter_config.json is damaged or init_r was changed."
            )

    def _check_schedule(self) -> None:
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError(
                "AdaLoRA needs total_step (the number of optimizer steps of the run), a value > 0."
            )
        if self.tinit < 0 or self.tfinal < 0:
            raise ConfigError(
                f"tinit and tfinal count steps, so they must be >= 0, got {self.tinit}, {self.tfinal}."
            )
        if not 0 <= self.target_r <= self.init_r:
            raise ConfigError(
                f"Need 0 <= target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}."
            )
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must lie in (0, 1), got {self.beta1} and {self.beta2}.")
        if self.deltaT < 1:
            raise ConfigError(f"deltaT (steps between budget allocations) must be >= 1, got {self.deltaT}.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"tinit={self.tinit}, tfinal={self.tfinal} leave no budgeting phase within total_step={self.total_step}; "
                "decrease tinit/tfinal or increase total_step."
            )


# --- layers ------------------------------------------------------------------------------------------
class AdaLoraLayer(LoraLayer):
    """SVD-form adapter on a linear layer (nn.Linear, GPT-2 Conv1D, bitsandbytes 4/8-bit) or nn.Conv2d.

    Reuses LoRA's bookkeeping (rank, scaling, dropout, input casting); the factors are plain parameters so the
    checkpoint keys are peft's: `<module>.lora_A`, `<module>.lora_E`, `<module>.lora_B` (no `.weight`)."""

    adapter_attrs = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum: dict[str, float] = {}

    def add(self, name: str, r: int, alpha: float, config: AdaLoraConfig, ranknum: int | None = None) -> None:
        if name in self.adapter_names:
            raise ConfigError(f"Adapter {name!r} already exists on this layer.")
        if r < 0:
            raise ConfigError(f"AdaLoRA rank must be >= 0, got {r}.")
        out_features, in_features = self._shape()
        kwargs = self._factor_kwargs()
        self.r[name] = r
        self.ranknum[name] = float(r if ranknum is None else ranknum)
        self.scaling[name] = alpha if alpha > 0 else float(r)
        self.dropout[name] = config.lora_dropout
        self.lora_A[name] = nn.Parameter(torch.randn(r, in_features, **kwargs))
        self.lora_E[name] = nn.Parameter(torch.randn(r, 1, **kwargs))
        self.lora_B[name] = nn.Parameter(torch.randn(out_features, r, **kwargs))
        if config.init_lora_weights:  # lambda = 0: the model starts as the base model
            nn.init.zeros_(self.lora_E[name])
            nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)

    def _shape(self) -> tuple[int, int]:
        """(out, in) of the flattened weight: a conv's kernel is folded into `in`, as peft does."""
        weight = self.base_weight()
        return weight.shape[0], math.prod(weight.shape[1:])

    def _factor_kwargs(self) -> dict:
        weight = self.base_layer.weight
        return {"device": weight.device, "dtype": self._dtype}

    def _input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A[name].dtype)
        p = self.dropout[name]
        return F.dropout(x, p, training=True) if (p > 0 and self.training) else x

    def _factor(self, name: str, for_merge: bool = False) -> torch.Tensor:
        """B (A * E) * scaling / ranknum, flattened to (out, in); for a merge, in float32 or wider."""
        a, b, e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        if for_merge:
            a, b, e = at_least_float32(a), at_least_float32(b), at_least_float32(e)
        return b @ (a * e) * self.scaling[name] / (self.ranknum[name] + _EPS)

    def delta_weight(self, name: str) -> torch.Tensor:
        return self._factor(name, for_merge=True).reshape(self.base_weight().shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.running_adapters():
            a, b, e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
            scale = self.scaling[name] / (self.ranknum[name] + _EPS)
            update = (self._input(name, x) @ (a * e).T @ b.T) * scale
            result = result + update.to(result.dtype)
        return result


class AdaLoraConv2d(AdaLoraLayer):
    """AdaLoRA on nn.Conv2d: the update is materialised as a kernel and applied with the base's conv settings."""

    def _shape(self) -> tuple[int, int]:
        if self.base_layer.groups != 1:
            raise UnsupportedModelError(
                "AdaLoRA on grouped convolutions is not supported; exclude this module."
            )
        return super()._shape()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        for name in self.running_adapters():
            kernel = self._factor(name).reshape(base.weight.shape)
            update = F.conv2d(
                self._input(name, x), kernel, None, base.stride, base.padding, base.dilation, base.groups
            )
            result = result + update.to(result.dtype)
        return result


def layer_class_for(module: nn.Module) -> type[AdaLoraLayer]:
    if is_linear(module) or is_quantized(module):
        return AdaLoraLayer
    if isinstance(module, nn.Conv2d):
        return AdaLoraConv2d
    raise UnsupportedModelError(
        f"AdaLoRA cannot wrap a {type(module).__name__}; it supports Linear, GPT-2 Conv1D, bitsandbytes 4/8-bit "
        "Linear and Conv2d. Narrow target_modules (or use exclude_modules) to skip it."
    )


# --- injection and files ---------------------------------------------------------------------------------
def _pattern_for(config: AdaLoraConfig, key: str, adapter_name: str) -> list[bool] | None:
    """The kept-rank mask of module `key` (peft strips the adapter name from the keys when saving)."""
    pattern = config.rank_pattern or {}
    for candidate in (f"{key}.lora_E", f"{key}.lora_E.{adapter_name}"):
        if candidate in pattern:
            return [bool(v) for v in pattern[candidate]]
    return None


def inject_adalora(peft_model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
    """Wrap every targeted module; a config with a rank_pattern builds the ranks the allocator kept."""
    if not config.inference_mode:
        trainable = [n for n, c in peft_model.peft_config.items() if not c.inference_mode]
        if trainable:
            raise ConfigError(
                f"AdaLoRA trains one adapter at a time and {trainable[0]!r} is trainable; "
                "add this one with inference_mode=True (or load it with is_trainable=False)."
            )
    model = peft_model.get_base_model()
    wrappers = []
    for key in find_targets(model, config):
        module = model.get_submodule(key)
        if not isinstance(module, AdaLoraLayer):
            if isinstance(module, LoraLayer):
                raise UnsupportedModelError(f"{key} already carries a LoRA adapter; AdaLoRA cannot join it.")
            module = layer_class_for(module)(module)
        pattern = _pattern_for(config, key, adapter_name)
        if pattern is not None and len(pattern) != config.init_r:
            raise ConfigError(
                f"rank_pattern for {key} has {len(pattern)} entries but init_r={config.init_r}; the config is damaged."
            )
        rank = sum(pattern) if pattern is not None else config.init_r
        module.add(adapter_name, rank, config.lora_alpha, config, ranknum=config.init_r)
        wrappers.append((key, module))
    for key, module in wrappers:
        replace_module(model, key, module)
    if any(m.fan_in_fan_out for _, m in wrappers):
        config.fan_in_fan_out = True


def _layers(peft_model: nn.Module, adapter_name: str) -> list[tuple[str, AdaLoraLayer]]:
    return [
        (name, m)
        for name, m in peft_model.get_base_model().named_modules()
        if isinstance(m, AdaLoraLayer) and adapter_name in m.lora_A
    ]


def _trainable_adapter(peft_model: nn.Module) -> str | None:
    names = [
        n
        for n, c in peft_model.peft_config.items()
        if not c.inference_mode and n in peft_model.active_adapters
    ]
    return names[0] if names else None


# --- orthogonality penalty -----------------------------------------------------------------------------
def orthogonality_penalty(peft_model: nn.Module, adapter_name: str) -> torch.Tensor | float:
    """Mean over the adapter's A and B matrices of ||A A^T - I||_F and ||B^T B - I||_F (peft's regulariser)."""
    total, count = 0.0, 0
    for _, layer in _layers(peft_model, adapter_name):
        for cov in (
            layer.lora_A[adapter_name] @ layer.lora_A[adapter_name].T,
            layer.lora_B[adapter_name].T @ layer.lora_B[adapter_name],
        ):
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return total / count if count else 0.0


# --- rank allocation ------------------------------------------------------------------------------------
class RankAllocator:
    """Importance scores and the budget schedule of AdaLoRA (peft's RankAllocator, keyed by module name)."""

    def __init__(self, peft_model: nn.Module, adapter_name: str) -> None:
        self.adapter_name = adapter_name
        self.config: AdaLoraConfig = peft_model.peft_config[adapter_name]
        layers = _layers(peft_model, adapter_name)
        self.init_bgt = sum(layer.r[adapter_name] for _, layer in layers)
        self.target_bgt = self.config.target_r * len(layers)
        self.finalized = False
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask at this step): flat, then cubic decay, then flat at the target."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * remaining**3 + self.target_bgt)
        return budget, step % c.deltaT == 0

    def _params(self, peft_model: nn.Module):
        for key, layer in _layers(peft_model, self.adapter_name):
            for attr in ("lora_A", "lora_E", "lora_B"):
                yield key, attr, getattr(layer, attr)[self.adapter_name]

    @torch.no_grad()
    def update_ipt(self, peft_model: nn.Module) -> None:
        """Sensitivity |w * grad|, its EMA (beta1) and the EMA (beta2) of its deviation from that average."""
        b1, b2 = self.config.beta1, self.config.beta2
        for key, attr, p in self._params(peft_model):
            if p.grad is None:
                raise RuntimeError(
                    f"AdaLoRA's rank allocator found no gradient on {key}.{attr}: call on_optimizer_step after "
                    "optimizer.step() and before optimizer.zero_grad(), in a step where the loss reached the adapter."
                )
            ipt = (p * p.grad).abs()
            name = f"{key}.{attr}"
            avg = self.exp_avg_ipt.get(name, torch.zeros_like(p))
            unc = self.exp_avg_unc.get(name, torch.zeros_like(p))
            avg = b1 * avg + (1 - b1) * ipt
            self.exp_avg_ipt[name] = avg
            self.exp_avg_unc[name] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _score(self, name: str) -> torch.Tensor:
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

    def triplet_scores(self, peft_model: nn.Module) -> dict[str, torch.Tensor]:
        """Per module, one score per rank: s(lambda_i) + mean_j s(Q_ij) + mean_k s(P_ki)."""
        scores = {}
        for key, _ in _layers(peft_model, self.adapter_name):
            a = self._score(f"{key}.lora_A").mean(dim=1)
            b = self._score(f"{key}.lora_B").mean(dim=0)
            scores[key] = self._score(f"{key}.lora_E").view(-1) + (a + b)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, peft_model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the lambda of the lowest-scoring triplets so that `budget` ranks remain (ties at the threshold
        are dropped together, as in peft)."""
        scores = self.triplet_scores(peft_model)
        k = self.init_bgt - budget
        if k <= 0:
            threshold = -math.inf
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        pattern = {}
        for key, layer in _layers(peft_model, self.adapter_name):
            drop = scores[key] <= threshold
            layer.lora_E[self.adapter_name].masked_fill_(drop.view(-1, 1), 0.0)
            pattern[f"{key}.lora_E"] = (~drop).tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self, peft_model: nn.Module) -> None:
        """Re-zero the dropped lambdas (the optimizer may have moved them) during the final phase."""
        for key, layer in _layers(peft_model, self.adapter_name):
            keep = _pattern_for(self.config, key, self.adapter_name)
            if keep is not None and len(keep) == layer.r[self.adapter_name]:
                mask = torch.tensor(keep, dtype=torch.bool, device=layer.lora_E[self.adapter_name].device)
                layer.lora_E[self.adapter_name].masked_fill_(~mask.view(-1, 1), 0.0)

    def step(self, peft_model: nn.Module, global_step: int) -> None:
        """peft's `update_and_allocate`: score, mask to the scheduled budget, and freeze the pattern at the end."""
        c = self.config
        final = c.total_step - c.tfinal
        if global_step < final:
            self.update_ipt(peft_model)
            budget, mask_now = self.budget_schedule(global_step)
            if mask_now:
                c.rank_pattern = self.mask_to_budget(peft_model, budget)
        elif not self.finalized:  # at `final` (or the first call after it, if the trainer skipped that step)
            c.rank_pattern = self.mask_to_budget(peft_model, self.target_bgt)
            self.finalized = True
            self.reset_ipt()
        else:
            self.apply_pattern(peft_model)


def rank_allocator(peft_model: nn.Module) -> RankAllocator | None:
    """The allocator of the trained adapter, made on first use and kept on the PeftModel."""
    name = _trainable_adapter(peft_model)
    if name is None:
        return None
    allocator = peft_model.__dict__.get("_adalora_allocator")
    if allocator is None or allocator.adapter_name != name:
        allocator = RankAllocator(peft_model, name)
        peft_model.__dict__["_adalora_allocator"] = allocator
    return allocator


def current_ranks(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Module name -> number of ranks in use (nonzero lambda), e.g. to watch the budget shrink."""
    return {
        key: int((layer.lora_E[adapter_name] != 0).sum()) for key, layer in _layers(peft_model, adapter_name)
    }


class AdaLoraMethod(Method):
    """LoRA in SVD form whose rank budget is shared out across layers while training (see the module docstring)."""

    peft_type = "ADALORA"
    config_class = AdaLoraConfig
    title = "AdaLoRA"
    variants = {"adalora": Variant()}
    typical_lr = 2e-3
    recipe_defaults = {"target_modules": "all-linear"}
    default_targets = "adalora"

    def inject(self, peft_model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        inject_adalora(peft_model, config, adapter_name)

    def tensors_to_save(
        self, peft_model: nn.Module, adapter_name: str, config: AdaLoraConfig, entries: dict
    ) -> dict:
        """Keep only the rows of A/E and columns of B that the rank pattern kept (peft's file format)."""
        if not config.rank_pattern:
            return entries
        out = dict(entries)
        for key, layer in _layers(peft_model, adapter_name):
            pattern = _pattern_for(config, key, adapter_name)
            if pattern is None or layer.r[adapter_name] == sum(pattern):  # absent, or already pruned
                continue
            keep = torch.tensor(pattern, dtype=torch.bool, device=layer.lora_E[adapter_name].device)
            prefix = f"{PREFIX}{key}"
            out[f"{prefix}.lora_A"] = layer.lora_A[adapter_name][keep]
            out[f"{prefix}.lora_E"] = layer.lora_E[adapter_name][keep]
            out[f"{prefix}.lora_B"] = layer.lora_B[adapter_name][:, keep]
        return out

    def forward(self, peft_model: nn.Module, *args, **kwargs):
        """Run the model; when it returns a loss, add orth_reg_weight x the orthogonality penalty of the trained
        adapter (as peft does, also in eval mode, so reported losses agree; skipped inside disable_adapter())."""
        outputs = peft_model.base_model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = _trainable_adapter(peft_model)
        if not isinstance(loss, torch.Tensor) or name is None or peft_model._disabled:
            return outputs
        weight = peft_model.peft_config[name].orth_reg_weight
        outputs.loss = loss + weight * orthogonality_penalty(peft_model, name)
        return outputs

    def on_optimizer_step(self, peft_model: nn.Module, global_step: int) -> None:
        """Update importance scores and reallocate ranks (no-op without a trainable adapter)."""
        allocator = rank_allocator(peft_model)
        if allocator is not None:
            allocator.step(peft_model, global_step)


METHOD = AdaLoraMethod()
