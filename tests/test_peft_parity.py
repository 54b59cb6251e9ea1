"""deltatune where peft users already work, side by side with the `peft` package on tiny models (issue 12).

Every check runs the same code against both libraries and compares outputs and files: transformers' Trainer and
trl's SFTTrainer running the scripts in examples/ unchanged, default target modules, mixed-adapter batches, the
AutoPeftModel classes, the functional API, the status reports, the model card and push_to_hub, and the failures the
issue quoted (T5 with "all-linear", default IA3 on T5, LoRA on a ViT patch projection, resized embeddings).
"""

import copy
import importlib.util
import json
import pathlib
import shutil

import pytest
import torch
from helpers import (
    ids,
    randomize_adapter,
    sentiment_rows,
    tiny_bert_cls,
    tiny_bert_folder,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_folder,
    word_tokenizer,
)
from safetensors.torch import load_file

import deltatune as dt
from deltatune.errors import AdapterNotFoundError, ConfigError, UnsupportedModelError
from deltatune.layer import Wrapper

peft = pytest.importorskip("peft")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return ViTForImageClassification(cfg).eval()


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(module, library, argv):
    """Run an example script with `import <library> as peft` (the only line that differs)."""
    module.peft = library
    try:
        return module.main([str(a) for a in argv])
    finally:
        module.peft = dt


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_adapter_folder(folder: pathlib.Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names, names
    assert not names & {"model.safetensors", "pytorch_model.bin"}, names


def same_logits(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


# --- transformers Trainer: examples/trainer_lora.py, unchanged ---------------------------------------------------
@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    tiny_bert_folder(str(root / "base"))
    for split, seed in (("train", 0), ("eval", 1)):
        rows = ["sentence\tlabel"] + [f"{t}\t{y}" for t, y in sentiment_rows(32, seed=seed)]
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_trainer_script_unchanged_matches_peft_and_saves_peft_adapters(cls_data, tmp_path):
    """Default TrainingArguments columns, eval_loss and compute_metrics, peft-format checkpoints that real peft
    loads with identical logits, and the same numbers as the script run with real peft."""
    from transformers import AutoModelForSequenceClassification

    example = load_example("trainer_lora")
    common = [
        "--model",
        cls_data / "base",
        "--train",
        cls_data / "train.tsv",
        "--eval",
        cls_data / "eval.tsv",
    ]
    common += ["--max-steps", 4, "--save-steps", 2]
    ours, our_metrics = run_example(example, dt, common + ["--output-dir", tmp_path / "ours"])
    theirs, their_metrics = run_example(example, peft, common + ["--output-dir", tmp_path / "theirs"])

    # The same numbers up to float rounding (deltatune's fused LoRA op adds in another order than peft's layers).
    assert {"eval_loss", "eval_accuracy"} <= set(our_metrics)  # labels found, compute_metrics called
    assert our_metrics["eval_loss"] == pytest.approx(their_metrics["eval_loss"], abs=1e-4)
    assert our_metrics["eval_accuracy"] == their_metrics["eval_accuracy"]
    assert losses(ours) == pytest.approx(losses(theirs), abs=1e-4)

    def base():
        return AutoModelForSequenceClassification.from_pretrained(cls_data / "base")

    x = ids(length=6, vocab=30)
    for sub in ("checkpoint-2", "checkpoint-4", "."):
        folder = tmp_path / "ours" / sub
        assert_adapter_folder(folder)
        in_peft = peft.PeftModel.from_pretrained(base(), str(folder))(x).logits
        same_logits(in_peft, dt.PeftModel.from_pretrained(base(), folder)(x).logits)
        their_run = peft.PeftModel.from_pretrained(base(), str(tmp_path / "theirs" / sub))(x).logits
        same_logits(in_peft, their_run, atol=1e-3)
    ours.model.eval()
    same_logits(in_peft, ours.model(x).logits)
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "library_name: peft" in card and "deltatune" in card

    resumed, _ = run_example(
        example,
        dt,
        common + ["--output-dir", tmp_path / "resumed", "--resume", tmp_path / "ours" / "checkpoint-2"],
    )
    assert len(losses(resumed)) == 4
    assert losses(resumed) == pytest.approx(losses(ours), abs=1e-6)  # steps 3-4 continue the same curve


# --- trl: examples/trl_sft.py, unchanged ---------------------------------------------------------------------
def test_trl_sft_script_unchanged_matches_peft(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_llama_folder(str(tmp_path / "base"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.eos_token = "[SEP]"  # SFTTrainer appends it to every text
    tokenizer.save_pretrained(base)
    rows = ["sentence\tlabel"] + [f"{t}\t{y}" for t, y in sentiment_rows(16)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    example = load_example("trl_sft")
    common = ["--model", base, "--train", tmp_path / "train.tsv", "--max-steps", 2]
    ours = run_example(example, dt, common + ["--output-dir", tmp_path / "ours"])
    theirs = run_example(example, peft, common + ["--output-dir", tmp_path / "theirs"])
    assert losses(ours) == pytest.approx(losses(theirs), abs=1e-4)

    assert_adapter_folder(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "ours")
    )
    x = ids(length=6, vocab=30)
    ours.model.eval()
    same_logits(loaded(x).logits, ours.model(x).logits)


def test_sft_trainer_refuses_an_adapter_on_the_lm_head():
    """trl's fused loss reads lm_head.weight directly, so an adapter there would silently never train."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj", "lm_head"]))
    tokenizer = word_tokenizer()
    tokenizer.eos_token = "[SEP]"
    args = SFTConfig("unused", bf16=False, report_to=[])
    with pytest.raises(ValueError, match="lm_head"):
        SFTTrainer(model, args, train_dataset=Dataset.from_dict({"text": ["a"]}), processing_class=tokenizer)


def test_sft_trainer_with_peft_config_of_deltatune_is_refused_with_the_fix():
    """trl builds the adapter itself with peft's get_peft_model after checking `isinstance(peft_config,
    peft.PeftConfig)`, so it cannot take deltatune's config; left alone it said "must be a peft.PeftConfig instance
    ... got LoraConfig". deltatune refuses it first, naming the fix, and the plain model is left as it was."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = word_tokenizer()
    tokenizer.eos_token = "[SEP]"
    args = SFTConfig("unused", bf16=False, report_to=[])
    data = Dataset.from_dict({"text": ["a"]})
    config = dt.LoraConfig(task_type="CAUSAL_LM", r=2)
    for call in (
        lambda: SFTTrainer(model, args, train_dataset=data, processing_class=tokenizer, peft_config=config),
        lambda: SFTTrainer(model=model, args=args, train_dataset=data, peft_config=config),
    ):
        with pytest.raises(TypeError, match=r"Wrap the model first: model = deltatune.get_peft_model"):
            call()
    assert not any(isinstance(m, Wrapper) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # peft's own config still takes trl's path (here: peft wraps the model itself)
    theirs = SFTTrainer(
        model, args, train_dataset=data, processing_class=tokenizer, peft_config=peft.LoraConfig(r=2)
    )
    assert isinstance(theirs.model, peft.PeftModel)


# --- default target modules ------------------------------------------------------------------------------------
def test_default_target_tables_equal_peft_where_both_have_a_row():
    from peft.utils import constants

    from deltatune import utils

    pairs = [
        (
            utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
            constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        ),
        (
            utils.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
            constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
        ),
        (
            utils.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
            constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        ),
        (
            utils.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
            constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        ),
    ]
    families = {
        "llama",
        "mistral",
        "qwen2",
        "gemma",
        "gpt2",
        "gpt_neox",
        "bert",
        "roberta",
        "deberta-v2",
        "t5",
        "bart",
    }
    for ours, theirs in pairs:
        common = set(ours) & set(theirs)
        assert families & set(theirs) <= common
        assert {k: sorted(ours[k]) for k in common} == {k: sorted(theirs[k]) for k in common}


@pytest.mark.parametrize(
    "factory, config_name, task",
    [
        (tiny_llama, "LoraConfig", "CAUSAL_LM"),
        (tiny_gpt2, "LoraConfig", "CAUSAL_LM"),
        (tiny_t5, "LoraConfig", "SEQ_2_SEQ_LM"),
        (tiny_llama, "IA3Config", "CAUSAL_LM"),
        (tiny_t5, "IA3Config", "SEQ_2_SEQ_LM"),
        (tiny_t5, "AdaLoraConfig", "SEQ_2_SEQ_LM"),
    ],
)
def test_config_without_target_modules_adapts_what_peft_adapts(factory, config_name, task, tmp_path):
    extra = {"total_step": 10} if config_name == "AdaLoraConfig" else {}
    ours = dt.get_peft_model(factory(), getattr(dt, config_name)(task_type=task, **extra))
    theirs = peft.get_peft_model(factory(), getattr(peft, config_name)(task_type=task, **extra))
    assert set(ours.state_dict()) == {
        k for k in theirs.state_dict() if ".ranknum." not in k
    }  # peft's AdaLoRA buffer
    our_cfg, their_cfg = ours.peft_config["default"], theirs.peft_config["default"]
    assert sorted(our_cfg.target_modules) == sorted(their_cfg.target_modules)
    if config_name == "IA3Config":
        assert sorted(our_cfg.feedforward_modules) == sorted(their_cfg.feedforward_modules)


# --- mixed-adapter batches: adapter_names ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """The same two LoRA adapters in deltatune and in peft (written by deltatune, read by peft)."""
    root = tmp_path_factory.mktemp("two")
    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    ours.add_adapter("b", dt.LoraConfig(r=2, target_modules=["k_proj", "down_proj"]))
    ours.set_adapter(["a", "b"])
    randomize_adapter(ours, seed=7)
    ours.set_adapter("a")
    ours.save_pretrained(root)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(root / "a"), adapter_name="a")
    theirs.load_adapter(str(root / "b"), adapter_name="b")
    return ours.eval(), theirs.eval()


def test_forward_with_adapter_names_equals_peft(two_adapters):
    ours, theirs = two_adapters
    x = ids(batch=4)
    names = ["a", "__base__", "b", "a"]
    with torch.no_grad():
        mixed = ours(input_ids=x, adapter_names=names).logits
        same_logits(mixed, theirs(input_ids=x, adapter_names=names).logits)
        ours.set_adapter("b")
        one = ours(input_ids=x[2:3]).logits
        ours.set_adapter("a")
    same_logits(mixed[2:3], one)  # each row got its own adapter, not the active one
    assert all(layer.row_adapters is None for layer in ours.adapter_layers())


def test_generate_with_adapter_names_equals_peft(two_adapters):
    ours, theirs = two_adapters
    x = ids(batch=3, length=5)
    names = ["b", "a", "__base__"]
    for options in ({"do_sample": False}, {"do_sample": False, "num_beams": 2}):
        kwargs = dict(max_new_tokens=3, pad_token_id=0, adapter_names=names, **options)
        assert torch.equal(ours.generate(input_ids=x, **kwargs), theirs.generate(input_ids=x, **kwargs))


def test_adapter_names_refuse_what_they_cannot_honour(two_adapters):
    ours, _ = two_adapters
    x = ids(batch=2)
    with pytest.raises(AdapterNotFoundError, match="'typo'"):
        ours(input_ids=x, adapter_names=["a", "typo"])
    with pytest.raises(ValueError, match="rows"):
        ours(input_ids=x, adapter_names=["a"])
    ia3 = dt.get_peft_model(tiny_llama(), dt.IA3Config())
    with pytest.raises(UnsupportedModelError, match="LoRA"):
        ia3(input_ids=x, adapter_names=["default", "default"])


def test_adapter_names_in_training_mode_train_each_rows_adapter(two_adapters):
    """peft refuses `adapter_names` in training mode; deltatune allows it (the README says so): the logits equal
    peft's mixed batch in eval mode (no dropout here), and each row's loss reaches only its own adapter."""
    ours, theirs = two_adapters
    ours = copy.deepcopy(ours)
    ours.set_adapter(["a", "b"])  # both trainable, as for multi-task training
    ours.train()
    x = ids(batch=4)
    names = ["a", "__base__", "b", "a"]
    logits = ours(input_ids=x, adapter_names=names).logits
    with torch.no_grad():
        same_logits(logits.detach(), theirs(input_ids=x, adapter_names=names).logits)
    theirs.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            theirs(input_ids=x, adapter_names=names)
    finally:
        theirs.eval()

    def reached(rows) -> set[str]:
        ours.zero_grad(set_to_none=True)
        ours(input_ids=x, adapter_names=names).logits[rows].pow(2).sum().backward()
        return {
            name.split(".")[-2]
            for name, p in ours.named_parameters()
            if "lora_" in name and p.grad is not None and p.grad.abs().sum() > 0
        }

    assert reached([0, 3]) == {"a"}
    assert reached([2]) == {"b"}
    assert reached([1]) == set()  # the base row trains no adapter


# --- AutoPeftModel* ------------------------------------------------------------------------------------------
def _auto_case(kind, root):
    from transformers import AutoModelForSeq2SeqLM

    if kind == "causal":
        base = tiny_llama_folder(str(root / "base"))
        return base, "CAUSAL_LM", "AutoPeftModelForCausalLM", dict(target_modules=["q_proj", "v_proj"])
    if kind in ("seq-cls", "token-cls"):
        base = tiny_bert_folder(str(root / "base"), task=kind)
        task = "SEQ_CLS" if kind == "seq-cls" else "TOKEN_CLS"
        name = (
            "AutoPeftModelForSequenceClassification"
            if kind == "seq-cls"
            else "AutoPeftModelForTokenClassification"
        )
        return base, task, name, dict(target_modules=["query", "value"])
    if kind in ("qa", "feature"):  # a BERT saved as the class the task loads (a QA head, or no head)
        from transformers import AutoModel, AutoModelForQuestionAnswering

        bert = tiny_bert_folder(str(root / "bert"))
        torch.manual_seed(0)
        auto = AutoModelForQuestionAnswering if kind == "qa" else AutoModel
        auto.from_pretrained(bert).save_pretrained(root / "base")
        task, name = (
            ("QUESTION_ANS", "AutoPeftModelForQuestionAnswering")
            if kind == "qa"
            else ("FEATURE_EXTRACTION", "AutoPeftModelForFeatureExtraction")
        )
        return str(root / "base"), task, name, dict(target_modules=["query", "value"])
    tiny_t5().save_pretrained(root / "base")
    AutoModelForSeq2SeqLM.from_pretrained(root / "base")  # the folder loads as a seq2seq model
    return str(root / "base"), "SEQ_2_SEQ_LM", "AutoPeftModelForSeq2SeqLM", dict(target_modules=["q", "v"])


def _outputs(output) -> list[torch.Tensor]:
    """What a task's model answers: logits, QA's start/end logits, or hidden states (feature extraction)."""
    names = ("logits", "start_logits", "end_logits", "last_hidden_state")
    return [getattr(output, n) for n in names if getattr(output, n, None) is not None]


@pytest.mark.parametrize("kind", ["causal", "seq-cls", "token-cls", "seq2seq", "qa", "feature"])
def test_auto_peft_models_load_the_named_base_like_peft(kind, tmp_path):
    import transformers

    base, task, auto_name, kwargs = _auto_case(kind, tmp_path)
    auto_class = getattr(transformers, dt.auto.AUTO_MODEL_CLASSES[task])
    model = dt.get_peft_model(auto_class.from_pretrained(base), dt.LoraConfig(task_type=task, r=4, **kwargs))
    assert model.peft_config["default"].base_model_name_or_path == base
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    ours = getattr(dt, auto_name).from_pretrained(tmp_path / "adapter")
    theirs = getattr(peft, auto_name).from_pretrained(str(tmp_path / "adapter"))
    assert type(ours).__name__ == type(theirs).__name__
    x = ids(length=6, vocab=30)
    extra = {"decoder_input_ids": x[:, :3]} if kind == "seq2seq" else {}
    mine, their_outputs = _outputs(ours(input_ids=x, **extra)), _outputs(theirs(input_ids=x, **extra))
    assert mine and len(mine) == len(their_outputs)
    for a, b in zip(mine, their_outputs):
        same_logits(a, b)
    if kind == "causal":
        with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
            dt.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")


def test_auto_peft_model_without_task_type_builds_the_class_the_folder_names(tmp_path):
    """No task_type: both libraries write peft's `auto_mapping` (the base class) and AutoPeftModel builds it."""
    from transformers import AutoModelForCausalLM

    base = tiny_llama_folder(str(tmp_path / "base"))
    for name, lib in (("ours", dt), ("theirs", peft)):
        model = lib.get_peft_model(AutoModelForCausalLM.from_pretrained(base), lib.LoraConfig(r=4))
        randomize_adapter(model)
        model.save_pretrained(str(tmp_path / name))
    ours_cfg, theirs_cfg = (
        json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("ours", "theirs")
    )
    assert ours_cfg["auto_mapping"] == theirs_cfg["auto_mapping"]
    x = ids(length=6, vocab=30)
    for name in ("ours", "theirs"):
        mine = dt.AutoPeftModel.from_pretrained(tmp_path / name)
        reference = peft.AutoPeftModel.from_pretrained(str(tmp_path / name))
        assert type(mine.get_base_model()).__name__ == "LlamaForCausalLM"
        same_logits(mine(x).logits, reference(x).logits)


# --- the functional API --------------------------------------------------------------------------------------
def test_state_dict_functions_and_load_peft_weights_equal_peft(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    randomize_adapter(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    want = peft.get_peft_model_state_dict(theirs)
    got = dt.get_peft_model_state_dict(ours)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    loaded = dt.load_peft_weights(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in peft.utils.load_peft_weights(str(tmp_path)).items())

    fresh = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    partial = {k: v for k, v in want.items() if "q_proj" in k}
    result = dt.set_peft_model_state_dict(
        fresh, {**partial, "base_model.model.nowhere.lora_A.weight": torch.zeros(1)}
    )
    assert result.unexpected_keys == ["base_model.model.nowhere.lora_A.weight"]
    assert result.missing_keys and all("up_proj" in k and ".default." in k for k in result.missing_keys)
    assert not dt.set_peft_model_state_dict(fresh, want).missing_keys
    x = ids()
    same_logits(fresh(x).logits, theirs(x).logits)


def test_inject_adapter_in_model_equals_peft():
    config = dict(r=4, target_modules=["q_proj", "v_proj"])
    ours = dt.inject_adapter_in_model(dt.LoraConfig(**config), tiny_llama())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), tiny_llama())
    assert type(ours).__name__ == "LlamaForCausalLM" and "default" in ours.peft_config
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    randomize_adapter(theirs)
    weights = peft.get_peft_model_state_dict(theirs)
    assert dt.get_peft_model_state_dict(ours).keys() == weights.keys()
    result = dt.set_peft_model_state_dict(ours, weights)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = ids()
    same_logits(ours(x).logits, theirs(x).logits)
    by_file = dt.inject_adapter_in_model(dt.LoraConfig(r=4), tiny_llama(), state_dict=weights)
    assert dt.get_peft_model_state_dict(by_file).keys() == weights.keys()  # targets read from the state dict


def test_layer_and_model_status_equal_peft(two_adapters):
    ours, theirs = two_adapters
    for model in (ours, theirs):
        model.set_adapter("b")
        model.base_model.merge_adapter(["b"])
    try:
        ours_layers, their_layers = dt.get_layer_status(ours), peft.get_layer_status(theirs)
        ignore = {"module_type"}
        assert [{k: v for k, v in vars(s).items() if k not in ignore} for s in ours_layers] == [
            {k: v for k, v in vars(s).items() if k not in ignore} for s in their_layers
        ]
        ignore = {"adapter_model_type"}
        want = {k: v for k, v in vars(peft.get_model_status(theirs)).items() if k not in ignore}
        assert {k: v for k, v in vars(ours.get_model_status()).items() if k not in ignore} == want
    finally:
        for model in (ours, theirs):
            model.unmerge_adapter()
            model.set_adapter("a")


# --- hub: model card and push_to_hub -------------------------------------------------------------------------
def test_push_to_hub_uploads_only_the_adapter_folder(monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls["files"] = sorted(p.name for p in pathlib.Path(folder_path).iterdir())
        calls["card"] = (pathlib.Path(folder_path) / "README.md").read_text()
        shutil.copytree(folder_path, tmp_path / "uploaded")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", r=4))
    model.push_to_hub("me/tiny-lora", private=True)
    assert calls["repo"] == ("me/tiny-lora", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "library_name: peft" in calls["card"] and 'from_pretrained("me/tiny-lora")' in calls["card"]
    assert "pipeline_tag: text-generation" in calls["card"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "uploaded"))
    x = ids()
    same_logits(theirs(x).logits, model(x).logits)


# --- the failures the issue quoted -----------------------------------------------------------------------------
def _deltatune_to_peft(factory, ours_config, theirs_config, x, tmp_path, **call):
    ours = dt.get_peft_model(factory(), ours_config)
    randomize_adapter(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(factory(), str(tmp_path))
    reference = peft.get_peft_model(factory(), theirs_config)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        same_logits(ours(x, **call).logits, theirs(x, **call).logits)
    return ours


def test_t5_all_linear_runs_and_matches_peft(tmp_path):
    x = ids(length=6)
    kwargs = dict(task_type="SEQ_2_SEQ_LM", r=4, target_modules="all-linear")
    _deltatune_to_peft(
        tiny_t5, dt.LoraConfig(**kwargs), peft.LoraConfig(**kwargs), x, tmp_path, labels=x[:, :4].clone()
    )


def test_default_ia3_on_t5_runs_and_matches_peft(tmp_path):
    x = ids(length=6)
    _deltatune_to_peft(
        tiny_t5,
        dt.IA3Config(task_type="SEQ_2_SEQ_LM"),
        peft.IA3Config(task_type="SEQ_2_SEQ_LM"),
        x,
        tmp_path,
        labels=x[:, :4].clone(),
    )


def test_lora_on_vit_patch_projection_conv2d_matches_peft(tmp_path):
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(r=4, target_modules=["projection", "q_proj", "v_proj"])  # transformers 5's ViT layer names
    ours = _deltatune_to_peft(tiny_vit, dt.LoraConfig(**kwargs), peft.LoraConfig(**kwargs), pixels, tmp_path)
    wrapped = {name.rsplit(".", 1)[-1] for name, m in ours.named_modules() if isinstance(m, Wrapper)}
    assert wrapped == {"projection", "q_proj", "v_proj"}  # every name matched: attention and the Conv2d


def test_resized_embeddings_with_embedding_targets_travel_with_the_adapter(tmp_path):
    """Resize, adapt embed_tokens, save: the file holds the resized base embedding as peft's does, so peft (and a
    freshly resized base whose new rows differ) load the same model."""

    def resized(seed):
        model = tiny_llama(
            tie_word_embeddings=True
        )  # an untied lm_head's new rows are not saved (peft's rule)
        torch.manual_seed(seed)  # new rows are drawn at random: each resize gives different ones
        model.resize_token_embeddings(70)
        return model

    kwargs = dict(r=4, target_modules=["embed_tokens", "q_proj"])
    ours = dt.get_peft_model(resized(1), dt.LoraConfig(**kwargs))
    randomize_adapter(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(resized(1), peft.LoraConfig(**kwargs))
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        theirs.save_pretrained(str(tmp_path / "theirs"))
    our_file, their_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert our_file.keys() == their_file.keys()
    x = torch.tensor([[65, 66, 3, 69, 1]])
    for load in (peft.PeftModel.from_pretrained, dt.PeftModel.from_pretrained):
        same_logits(load(resized(2), str(tmp_path / "ours"))(x).logits, ours(x).logits)
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(ours_config["target_modules"]) == ["embed_tokens", "q_proj"]


# --- import paths ----------------------------------------------------------------------------------------------
def test_peft_import_paths_exist():
    names = [
        "AutoPeftModel",
        "AutoPeftModelForCausalLM",
        "AutoPeftModelForSequenceClassification",
        "AutoPeftModelForSeq2SeqLM",
        "AutoPeftModelForTokenClassification",
        "AutoPeftModelForQuestionAnswering",
        "AutoPeftModelForFeatureExtraction",
        "PeftModel",
        "PeftConfig",
        "LoraConfig",
        "AdaLoraConfig",
        "IA3Config",
        "PromptTuningConfig",
        "PrefixTuningConfig",
        "PromptEncoderConfig",
        "TaskType",
        "PeftType",
        "get_peft_model",
        "inject_adapter_in_model",
        "get_peft_model_state_dict",
        "set_peft_model_state_dict",
        "load_peft_weights",
        "get_layer_status",
        "get_model_status",
        "prepare_model_for_kbit_training",
    ]
    assert [n for n in names if not hasattr(dt, n)] == []
    util_names = [
        "get_peft_model_state_dict",
        "set_peft_model_state_dict",
        "load_peft_weights",
        "PeftType",
        "TaskType",
        "ModulesToSaveWrapper",
        "_get_submodules",
        "CONFIG_NAME",
        "SAFETENSORS_WEIGHTS_NAME",
        "WEIGHTS_NAME",
        "prepare_model_for_kbit_training",
        "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    ]
    from deltatune import utils

    assert [n for n in util_names if not hasattr(utils, n)] == []
    assert [n for n in util_names if getattr(utils, n) is None or not hasattr(peft.utils, n)] == []
    assert (utils.CONFIG_NAME, utils.WEIGHTS_NAME, utils.SAFETENSORS_WEIGHTS_NAME) == (
        peft.utils.CONFIG_NAME,
        peft.utils.WEIGHTS_NAME,
        peft.utils.SAFETENSORS_WEIGHTS_NAME,
    )


# --- the transformers / accelerate / trl hook --------------------------------------------------------------------
def test_hook_recognises_deltatune_models_and_leaves_others_alone():
    import types

    from accelerate.utils import is_peft_model
    from transformers import trainer, trainer_utils

    from deltatune.integrations import transformers as hook
    from deltatune.layer import AdapterLayer

    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for check in (trainer._is_peft_model, trainer_utils._is_peft_model, is_peft_model):
        assert check(ours) and check(theirs) and not check(tiny_llama())
    assert (
        trainer._is_peft_model is trainer_utils._is_peft_model
    )  # one function, rebound where it was imported
    hook.install()  # idempotent
    assert trainer._is_peft_model.__wrapped__.__module__ == "transformers.trainer_utils"

    without_peft = types.ModuleType("fake_sft_trainer")  # trl with peft uninstalled has no BaseTunerLayer
    hook._patch_trl_sft(without_peft)
    assert without_peft.BaseTunerLayer is AdapterLayer


@pytest.mark.parametrize("config_name", ["LoraConfig", "IA3Config"])
def test_vision_transformer_without_target_modules_adapts_attention_and_runs(config_name):
    """peft has no ViT row; ours must match the module names transformers gives ViT today (q_proj/v_proj, mlp.fc2),
    or a bare config refuses with "matched no module"."""
    model = dt.get_peft_model(tiny_vit(), getattr(dt, config_name)())
    wrapped = {
        ".".join(name.split(".")[-2:])
        for name, module in model.named_modules()
        if isinstance(module, Wrapper)
    }
    expected = (
        {"attention.q_proj", "attention.v_proj"}
        if config_name == "LoraConfig"
        else {
            "attention.k_proj",
            "attention.v_proj",
            "mlp.fc2",
        }
    )
    assert wrapped == expected
    logits = model(pixel_values=torch.randn(2, 3, 16, 16)).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_wrapped_linear_layers_fall_through_like_peft():
    """`weight`, `bias`, `in_features`, `out_features` of a wrapped Linear are its base layer's (the same tensors,
    not copies), as in peft's layers, with and without a bias."""
    for factory, targets in (
        (tiny_bert_cls, ["query", "value", "dense"]),
        (tiny_llama, ["q_proj", "down_proj"]),
    ):
        ours = dt.get_peft_model(factory(), dt.LoraConfig(r=2, target_modules=targets))
        theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=2, target_modules=targets))
        their_layers = dict(theirs.named_modules())
        wrapped = [(n, m) for n, m in ours.named_modules() if isinstance(m, Wrapper)]
        assert wrapped and {n for n, _ in wrapped} == {
            n for n, m in their_layers.items() if isinstance(m, peft.tuners.lora.LoraLayer)
        }
        for name, layer in wrapped:
            base, their = layer.get_base_layer(), their_layers[name]
            assert isinstance(base, torch.nn.Linear), name
            assert layer.weight is base.weight and layer.bias is base.bias, name
            assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features), name
            assert (layer.in_features, layer.out_features) == (their.in_features, their.out_features), name
            assert torch.equal(layer.weight, their.weight), name
            assert (layer.bias is None) == (their.bias is None), name
            if layer.bias is not None:
                assert torch.equal(layer.bias, their.bias), name
        assert any(layer.bias is not None for _, layer in wrapped) or factory is tiny_llama


def test_mixed_true_is_refused_and_leaves_the_model_unchanged():
    """peft's PeftMixedModel (adapters of different methods in one model) is "not yet": a clear ConfigError."""
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"mixed=True .*not supported; use one method per PeftModel"):
        dt.get_peft_model(model, dt.LoraConfig(r=2), mixed=True)
    assert not any(isinstance(m, Wrapper) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not hasattr(dt, "PeftMixedModel")


def test_save_pretrained_works_from_a_source_checkout_without_package_metadata(monkeypatch, tmp_path):
    """A GPU box or cluster job often runs deltatune from a checkout on PYTHONPATH, with no installed metadata;
    saving the trained adapter must not fail over the model card's version line (it once raised there)."""
    import importlib.metadata
    import re

    def no_metadata(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    monkeypatch.setattr(importlib.metadata, "distribution", no_metadata)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", r=4))
    model.save_pretrained(tmp_path)
    pyproject = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert dt.__version__ == re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert f"- deltatune {dt.__version__}" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "adapter_model.safetensors").is_file()
