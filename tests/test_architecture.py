"""The house rules: layers import downward only, the core hides no import in a function, and every list of
methods comes from the registry (so a new method is one file plus one registry line)."""

import ast
import dataclasses
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import registry
from deltatune.config import PeftConfig
from deltatune.method import Method, Variant

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = [
    p
    for p in (ROOT / "deltatune").rglob("*.py")
    if not any(part in ("apps", "train") for part in p.relative_to(ROOT / "deltatune").parts)
]
# Third-party packages the core may import late, because a user may not have them installed.
OPTIONAL = {"bitsandbytes"}


def test_import_contracts_hold():
    lint = pathlib.Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_import_inside_a_function_in_the_core():
    late = []
    for path in CORE:
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                late += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] not in OPTIONAL]
    assert late == []


def test_readme_methods_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert registry.methods_table() in readme


def test_peft_type_and_config_lookup_follow_the_registry():
    assert [t.value for t in dt.PeftType] == [m.peft_type for m in registry.METHODS]
    for method in registry.METHODS:
        assert registry.config_class_for(method.peft_type) is method.config_class
        assert method.variants, f"{method.peft_type} has no recipe name"


# --- a new method is one file + one registry line --------------------------------------------------
@dataclasses.dataclass
class ScaleConfig(PeftConfig):
    """A toy method: one learned scale on the model's output."""

    init_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "TOY_SCALE"


class ScaleMethod(Method):
    peft_type = "TOY_SCALE"
    config_class = ScaleConfig
    title = "toy scale"
    variants = {"toy_scale": Variant()}
    wraps_base = True
    mergeable = False
    peft_format = False

    def inject(self, peft_model, config, adapter_name):
        scales = peft_model._modules.setdefault("toy_scales", nn.ParameterDict())
        scales[adapter_name] = nn.Parameter(torch.tensor(float(config.init_scale)))

    def remove(self, peft_model, adapter_name):
        peft_model._modules["toy_scales"].pop(adapter_name, None)

    def state_dict(self, peft_model, adapter_name, config):
        return {"toy_scale": peft_model._modules["toy_scales"][adapter_name]}

    def forward(self, peft_model, *args, **kwargs):
        out = peft_model.base_model(*args, **kwargs)
        if peft_model._disabled:
            return out
        return out * peft_model._modules["toy_scales"][peft_model.active_adapters[0]].reshape(())


@pytest.fixture
def toy_method(monkeypatch):
    from deltatune import config

    monkeypatch.setattr(registry, "METHODS", (*registry.METHODS, ScaleMethod()))  # the one registry line
    monkeypatch.setattr(registry, "BY_PEFT_TYPE", {m.peft_type: m for m in registry.METHODS})
    monkeypatch.setitem(config.CONFIG_CLASSES, "TOY_SCALE", ScaleConfig)
    return registry.METHODS[-1]


def test_a_registered_method_is_everywhere(toy_method, tmp_path):
    from deltatune.train.recipe import method_info, validate

    base = nn.Linear(3, 2)
    model = dt.get_peft_model(base, ScaleConfig(init_scale=2.0))
    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x), 2 * base(x))
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x))
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(nn.Linear(3, 2), tmp_path)
    assert isinstance(loaded.peft_config["default"], ScaleConfig)
    assert method_info("toy-scale")[0] == "TOY_SCALE"  # recipes and the CLI read the registry
    validate({"model": "m", "method": "toy_scale", "toy_scale": {"init_scale": 3.0}})
    assert "toy scale" in registry.methods_table()
