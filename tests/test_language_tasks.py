"""Question answering, summarization, translation, regression, multi-label and Chinese text: metrics against
hand-computed values, each task trained on a tiny model, and each task's `predict` on JSON rows."""

import json
import math

import datasets
import pytest
import torch
import yaml
from helpers import (
    sentiment_rows,
    tiny_bert_folder,
    tiny_llama_folder,
    train_config,
    word_tokenizer,
    write_csv,
)

from deltatune import LoraConfig, get_peft_model
from deltatune.errors import DataError
from deltatune.train import metrics as M
from deltatune.train.data import Cleaning, LabelMap, clean_text, normalize_spaces, to_half_width
from deltatune.train.recipe import load_recipe, load_run, train_from_recipe
from deltatune.train.tasks import (
    TASKS,
    GenerativeQATask,
    MultiLabelClassificationTask,
    QuestionAnsweringTask,
    RegressionTask,
    SequenceClassificationTask,
    SummarizationTask,
    TranslationTask,
)
from deltatune.train.trainer import Trainer

cfg = train_config  # a few quiet steps of a tiny model


def table(**columns):
    return datasets.Dataset.from_list([dict(zip(columns, row)) for row in zip(*columns.values())])


# --- metrics against hand-computed values ---------------------------------------------------------------------
def test_squad_exact_match_and_f1_by_hand():
    # normalization: lower case, no punctuation, no articles, single spaces
    assert M.squad_normalize("The  Eiffel Tower, Paris!") == "eiffel tower paris"
    assert M.squad_exact("the Eiffel tower", "Eiffel Tower.") == 1.0
    # "eiffel tower in paris" vs "eiffel tower": 2 common tokens, P = 2/4, R = 2/2 -> F1 = 2*0.5*1/1.5 = 2/3
    assert M.squad_f1("The Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    assert M.squad_f1("", "") == 1.0 and M.squad_f1("tower", "") == 0.0  # SQuAD 2.0: unanswerable
    # Chinese: one token per character; 北京天安门 vs 天安门: 3 common, P = 3/5, R = 1 -> F1 = 0.75
    assert M.squad_f1("北京天安门。", "天安门") == pytest.approx(0.75)
    scores = M.qa_scores(
        ["Eiffel Tower", "", "in 1889", "no idea"],
        [["the Eiffel Tower"], [], ["1889", "in 1889"], []],
    )
    # EM: 1, 1, 1 (best of two golds), 0 -> 75; F1 the same here
    assert scores["exact_match"] == pytest.approx(75.0) and scores["f1"] == pytest.approx(75.0)
    assert scores["has_answer_exact"] == pytest.approx(100.0) and scores["no_answer_exact"] == pytest.approx(
        50.0
    )


def test_rouge_bleu_and_chrf_work_on_chinese():
    english = M.rouge_scores(["the cat sat on the mat"], ["a cat sat on a mat"])
    # 6 tokens each, 4 shared unigrams (cat sat on mat): P = R = F = 4/6; LCS is the same 4 tokens
    assert english["rouge1"] == pytest.approx(100 * 4 / 6) and english["rougeL"] == pytest.approx(100 * 4 / 6)
    # bigrams: (cat sat) (sat on) shared of 5 each -> 2/5
    assert english["rouge2"] == pytest.approx(40.0)
    chinese = M.rouge_scores(["我爱北京"], ["我爱天安门"])
    # characters: 我 爱 shared; P = 2/4, R = 2/5 -> F = 2*0.5*0.4/0.9
    assert chinese["rouge1"] == pytest.approx(100 * 0.4 / 0.9)
    assert chinese["prediction_words"] == 4 and chinese["reference_words"] == 5
    assert M.bleu_tokenizer(["天安门"]) == "zh" and M.bleu_tokenizer(["a cat"]) == "13a"
    import sacrebleu

    preds, refs = ["我 爱 北京 天安门"], ["我爱北京天安门"]
    assert M.generation_scores(preds, refs)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score
    )
    assert M.generation_scores(["我爱北京天安门"], refs)["bleu"] == pytest.approx(100.0)


def test_regression_scores_by_hand():
    pred, ref = [1.0, 2.0, 4.0, 3.0], [1.0, 3.0, 3.0, 5.0]
    scores = M.regression_scores(pred, ref)
    assert scores["mse"] == pytest.approx((0 + 1 + 1 + 4) / 4)
    assert scores["mae"] == pytest.approx((0 + 1 + 1 + 2) / 4)
    assert scores["rmse"] == pytest.approx(math.sqrt(1.5))
    mp, mr = sum(pred) / 4, sum(ref) / 4
    cov = sum((p - mp) * (r - mr) for p, r in zip(pred, ref))
    pearson = cov / math.sqrt(sum((p - mp) ** 2 for p in pred) * sum((r - mr) ** 2 for r in ref))
    assert scores["pearson"] == pytest.approx(pearson)
    # ranks: pred 1 2 4 3, ref 1 2.5 2.5 4 -> Pearson of the ranks
    rp, rr = [1, 2, 4, 3], [1, 2.5, 2.5, 4]
    mrp, mrr = 2.5, 2.5
    rho = sum((a - mrp) * (b - mrr) for a, b in zip(rp, rr)) / math.sqrt(
        sum((a - mrp) ** 2 for a in rp) * sum((b - mrr) ** 2 for b in rr)
    )
    assert scores["spearman"] == pytest.approx(rho)
    assert math.isnan(M.regression_scores([2.0, 2.0], [1.0, 3.0])["pearson"])  # undefined, not a made-up 0


def test_multilabel_scores_by_hand():
    ref = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    pred = [[1, 0, 0], [0, 1, 1], [1, 1, 0]]
    scores = M.multilabel_scores(pred, ref, ["a", "b", "c"])
    # per label (tp, fp, fn): a (2, 0, 0) -> F1 1; b (2, 0, 0) -> 1; c (0, 1, 1) -> 0
    assert scores["f1_per_label"] == {"a": 1.0, "b": 1.0, "c": 0.0}
    assert scores["f1_macro"] == pytest.approx(2 / 3)
    # micro: tp 4, fp 1, fn 1 -> P = R = 4/5
    assert scores["f1_micro"] == pytest.approx(0.8)
    assert scores["subset_accuracy"] == pytest.approx(1 / 3)


def test_classification_report_per_class_and_confusion_matrix(tmp_path):
    refs, preds = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    scores = M.classification_scores(preds, refs, ["neg", "pos", "neutral"])
    assert scores["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # neg: P 2/2, R 2/3; pos: P 1/2, R 1/2; neutral: P 1/2, R 1
    assert scores["per_class"]["neg"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    assert scores["per_class"]["pos"]["f1"] == pytest.approx(0.5)
    assert scores["per_class"]["neutral"]["f1"] == pytest.approx(2 / 3)
    task = SequenceClassificationTask(word_tokenizer())
    task.report({f"test_{k}": v for k, v in scores.items()}, str(tmp_path))
    assert (tmp_path / "confusion_matrix_test.png").stat().st_size > 1000


# --- Chinese text -------------------------------------------------------------------------------------------
def test_full_width_and_cjk_whitespace_cleaning():
    assert to_half_width("ＡＢＣ１２３，好！　ok。") == "ABC123,好! ok。"  # 。 has no ASCII twin and stays
    assert normalize_spaces("  这 部  电影\t很 好 ， really  good ") == "这部电影很好， really good"
    both = Cleaning(normalize_width=True, normalize_whitespace=True)
    assert clean_text("这部 电影　很好！！", both) == "这部电影很好!!"


# --- tasks on tiny models -----------------------------------------------------------------------------------
def tiny_bert(head, **kw):
    from transformers import BertConfig

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(word_tokenizer()),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )
    return head(config)


CONTEXT = "the movie was very good and the plot was dull but the acting was superb and really fun"
QA_ROWS = dict(
    question=["was the movie good", "what was dull", "is it sad"],
    context=[CONTEXT] * 3,
    answers=[
        {"text": ["very good"], "answer_start": [CONTEXT.index("very good")]},
        {"text": ["the plot"], "answer_start": [CONTEXT.index("the plot")]},
        {"text": [], "answer_start": []},
    ],
)


def test_qa_windows_carry_the_answer_as_token_positions():
    tok = word_tokenizer()
    task = QuestionAnsweringTask(tok, max_length=14, doc_stride=4)
    features = task.prepare(table(**QA_ROWS))
    first = [f for f in features if f["example"] == 0]
    assert len(first) > 2  # the context does not fit one window of 14 tokens
    found = [f for f in first if f["start_positions"] > 0]
    assert found, "some window must contain the answer"
    for f in found:
        a, b = f["offsets"][f["start_positions"]][0], f["offsets"][f["end_positions"]][1]
        assert CONTEXT[a:b] == "very good"
    assert all((f["start_positions"], f["end_positions"]) == (0, 0) for f in features if f["example"] == 2)
    # a start that does not point at its answer (e.g. after cleaning) moves to the nearest occurrence
    moved = task.prepare(
        table(question=["q"], context=["so fun and fun"], answers=[{"text": ["fun"], "answer_start": [12]}])
    )
    assert moved[0]["answers"] == ["fun"]
    with pytest.raises(DataError, match="does not occur"):
        task.prepare(
            table(question=["q"], context=["good"], answers=[{"text": ["bad"], "answer_start": [0]}])
        )


def test_a_question_longer_than_the_window_is_cut_not_a_tokenizer_panic():
    """A 40-token question in 24-token windows with stride 12 left the context 0 tokens of room, and the fast
    tokenizer panicked from Rust; the question is now cut to a third of the window, as BERT's SQuAD recipe does."""
    task = QuestionAnsweringTask(word_tokenizer(), max_length=24, doc_stride=12)
    question = " ".join(["was the movie good"] * 10)
    rows = dict(question=[question], context=[CONTEXT], answers=[QA_ROWS["answers"][0]])
    features = task.prepare(table(**rows))
    assert all(len(f["input_ids"]) <= 24 for f in features)
    question_tokens = [
        sum(span is None for span in f["offsets"]) - 3 for f in features
    ]  # minus [CLS] and 2 [SEP]
    assert set(question_tokens) == {24 // 3}
    found = [f for f in features if f["start_positions"] > 0]
    assert found and all(
        CONTEXT[f["offsets"][f["start_positions"]][0] : f["offsets"][f["end_positions"]][1]] == "very good"
        for f in found
    )


def test_qa_decoding_takes_the_best_span_over_windows_or_no_answer():
    task = QuestionAnsweringTask(word_tokenizer(), max_length=16)
    context = "abc def ghi"
    offsets = [None, (0, 3), (4, 7), (8, 11)]
    window = {"offsets": offsets, "context": context}

    def logits(values):
        return torch.tensor(values, dtype=torch.float)

    # window 1 prefers "def" (2 + 2 = 4); window 2 prefers "def ghi" (3 + 3 = 6) -> the best over windows wins
    w1 = (window, logits([0, 0, 2, 0]), logits([0, 0, 2, 0]))
    w2 = (window, logits([0, 0, 3, 0]), logits([0, 0, 0, 3]))
    assert task.decide(*task.best_span([w1, w2]))[0] == "def ghi"
    # a no-answer score (position 0) above every span's: ""
    w3 = (window, logits([9, 0, 3, 0]), logits([9, 0, 0, 3]))
    assert task.decide(*task.best_span([w3]))[0] == ""
    # an end before its start is never chosen
    w4 = (window, logits([0, 0, 0, 5]), logits([0, 5, 0, 0]))
    assert task.decide(*task.best_span([w4]))[0] in ("ghi", "abc")


def test_qa_no_answer_threshold_is_fitted_for_the_best_f1(monkeypatch):
    task = QuestionAnsweringTask(word_tokenizer())
    # (best span, no-answer score) per question; margins span - null: -1, +1, -0.5
    found = [(("x", 5.0, 0, 1), 6.0), (("y", 3.0, 0, 1), 2.0), (("z", 4.0, 0, 1), 4.5)]
    features = [
        {"example": 0, "answers": ["x"]},
        {"example": 1, "answers": []},
        {"example": 2, "answers": ["z"]},
    ]
    monkeypatch.setattr(task, "candidates", lambda model, feats, batch_size: (found, 0.0))
    assert task.evaluate(None, features, 8)["f1"] == pytest.approx(
        0.0
    )  # threshold 0: y answered, x and z not
    # thresholds tried: -2 (always answer): x, y, z -> F1 2/3; -1: y, z -> 1/3; -0.5 and 0: y -> 0; 1: none -> 1/3
    assert task.calibrate(None, features, 8) == {"null_threshold": -2.0}
    assert task.evaluate(None, features, 8)["f1"] == pytest.approx(200 / 3)


def test_extractive_qa_trains_and_predicts_json_rows(tmp_path):
    from transformers import BertForQuestionAnswering

    tok = word_tokenizer()
    task = QuestionAnsweringTask(tok, max_length=24, doc_stride=8)
    features = task.prepare(table(**{k: v * 4 for k, v in QA_ROWS.items()}))
    model = get_peft_model(
        tiny_bert(BertForQuestionAnswering),
        LoraConfig(r=4, target_modules=["query", "value"], task_type="QUESTION_ANS"),
    )
    summary = Trainer(model, task, features, features, cfg(tmp_path, max_steps=60, lr=3e-2)).train()
    final = summary["final"]
    assert {"eval_exact_match", "eval_f1", "eval_has_answer_f1", "eval_no_answer_f1"} <= set(final)
    assert final["eval_f1"] > 50  # above answering "no answer" to all (33.3)
    out = task.predict(model, [{"question": "what was dull", "context": CONTEXT}])
    assert set(out[0]) == {"answer", "score", "start", "end"}
    json.dumps(out)


def test_summarization_on_a_decoder_cuts_the_source_not_the_summary(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_llama_folder(str(tmp_path / "llama"))
    tok = AutoTokenizer.from_pretrained(folder)
    task = SummarizationTask(tok, "document", "summary", max_length=64, max_new_tokens=4, generate_samples=4)
    long_document = " ".join(["the movie was good and fun"] * 30)
    features = task.prepare(
        table(document=[long_document, "the plot was bad"] * 4, summary=["good", "bad"] * 4)
    )
    assert all(len(f["input_ids"]) <= 64 for f in features)
    assert all(any(label != -100 for label in f["labels"]) for f in features)  # the summary survived
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    final = Trainer(model, task, features, features, cfg(tmp_path / "run")).train()["final"]
    assert {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_length_ratio"} <= set(final)
    assert set(task.predict(model, [{"document": "the movie was good"}])[0]) == {"summary"}


def test_summarization_and_translation_on_an_encoder_decoder(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    tok = word_tokenizer()
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=3,
        )
    )
    model = get_peft_model(t5, LoraConfig(r=2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    summarize = SummarizationTask(tok, "document", "summary", encoder_decoder=True, max_new_tokens=3)
    features = summarize.prepare(
        table(document=["good film", "bad plot"] * 4, summary=["great", "awful"] * 4)
    )
    assert features[0]["prompt"] == "summarize: good film"
    final = Trainer(model, summarize, features, features, cfg(tmp_path)).train()["final"]
    assert "eval_rougeL" in final
    translate = TranslationTask(
        tok, source_lang="en", target_lang="fr", encoder_decoder=True, max_new_tokens=3
    )
    assert translate.prompt({"source": "good film"}) == "translate English to French: good film"
    assert set(translate.predict(model, [{"source": "good film"}])[0]) == {"translation"}


def test_translation_instruction_and_generative_qa_on_a_decoder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_llama_folder(str(tmp_path / "llama"))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    translate = TranslationTask(tok, max_length=64, max_new_tokens=3)
    assert "Translate the following Chinese text into English." in translate.prompt({"source": "good"})
    scores = translate.evaluate(model, translate.prepare(table(source=["good"] * 2, target=["great"] * 2)), 2)
    assert {"bleu", "chrf", "eval_loss"} <= set(scores)
    qa = GenerativeQATask(tok, max_length=64, max_new_tokens=3)
    features = qa.prepare(table(**QA_ROWS))
    assert [f["reference"] for f in features] == ["very good", "the plot", "unanswerable"]
    assert features[2]["gold"] == []
    assert {"exact_match", "f1"} <= set(qa.evaluate(model, features, 2))
    assert set(qa.predict(model, [{"question": "q", "context": CONTEXT}])[0]) == {"answer"}


def test_regression_trains_on_float_labels_and_predicts_values(tmp_path):
    from transformers import BertForSequenceClassification

    task = RegressionTask(word_tokenizer())
    features = task.prepare(
        table(text=["good film", "bad film", "fine film"] * 4, label=[1.5, -0.5, 0.5] * 4)
    )
    assert features[0]["labels"] == 1.5
    model = get_peft_model(
        tiny_bert(BertForSequenceClassification, num_labels=1),
        LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    final = Trainer(model, task, features, features, cfg(tmp_path, max_steps=40, lr=3e-2)).train()["final"]
    predictions = [
        r["value"]
        for r in task.predict(model, [{"text": t} for t in ["good film", "bad film", "fine film"] * 4])
    ]
    assert final["eval_mse"] == pytest.approx(
        M.regression_scores(predictions, [1.5, -0.5, 0.5] * 4)["mse"], rel=1e-4
    )
    assert final["eval_mse"] < 0.5 and final["eval_pearson"] > 0.8
    with pytest.raises(DataError, match="needs a number"):
        task.prepare(table(text=["a"], label=["high"]))


def test_multilabel_trains_and_fits_thresholds_per_label(tmp_path):
    from transformers import BertForSequenceClassification

    task = MultiLabelClassificationTask(word_tokenizer(), label_column="tags")
    rows = table(
        text=["good film", "bad plot", "dull", "good plot"] * 4,
        tags=[["pos", "film"], ["neg"], [], ["pos"]] * 4,
    )
    features = task.prepare(rows)
    assert task.labels.names == ["film", "neg", "pos"] and features[0]["labels"] == [1.0, 0.0, 1.0]
    model = get_peft_model(
        tiny_bert(BertForSequenceClassification, num_labels=3),
        LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    final = Trainer(model, task, features, features, cfg(tmp_path, max_steps=40, lr=3e-2)).train()["final"]
    assert {"eval_f1_micro", "eval_f1_macro", "eval_subset_accuracy"} <= set(final)
    fitted = task.calibrate(model, features, 8)
    assert len(fitted["thresholds"]) == 3 and task.thresholds == fitted["thresholds"]
    # the fitted thresholds are at least as good, label by label, as 0.5 on the data they were fitted on
    assert task.evaluate(model, features, 8)["f1_macro"] >= final["eval_f1_macro"] - 1e-9
    out = task.predict(model, [{"text": "good film"}])[0]
    assert set(out) == {"labels", "scores"} and set(out["scores"]) == {"film", "neg", "pos"}


def test_float_or_list_labels_are_refused_by_the_classifier():
    task = SequenceClassificationTask(word_tokenizer())
    with pytest.raises(DataError, match="task: regression"):
        task.prepare(table(text=["a", "b"], label=[0.25, 1.0]))
    with pytest.raises(DataError, match="task: multi-label"):
        SequenceClassificationTask(word_tokenizer()).prepare(table(text=["a"], label=[["x", "y"]]))
    assert SequenceClassificationTask(word_tokenizer()).prepare(table(text=["a", "b"], label=[0.0, 1.0]))


# --- recipes ------------------------------------------------------------------------------------------------
def recipe(tmp_path, **keys):
    base = dict(
        method="lora",
        lora={"r": 2},
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        batch_size=8,
        lr=1e-2,
        progress=False,
        tensorboard=False,
        plot=False,
        num_threads=1,
    )
    return load_recipe(None, {**base, **keys})


def test_recipe_num_labels_1_is_regression_and_reports_before_and_after(tmp_path):
    model = tiny_bert_folder(str(tmp_path / "bert"))
    rows = [(text, float(label) * 2 - 0.5) for text, label in sentiment_rows(40)]
    write_csv(str(tmp_path / "train.csv"), rows[:30])
    write_csv(str(tmp_path / "dev.csv"), rows[30:])
    raw = recipe(
        tmp_path,
        model=model,
        num_labels=1,
        train_file=str(tmp_path / "train.csv"),
        eval_file=str(tmp_path / "dev.csv"),
        test_file=str(tmp_path / "dev.csv"),
        eval_before=True,
    )
    metrics = train_from_recipe(raw)["metrics"]
    assert {"before_eval_mse", "before_test_mse", "eval_mse", "test_pearson"} <= set(metrics)
    model, task, run = load_run(str(tmp_path / "run"))
    assert run.task == "regression" and isinstance(task, RegressionTask)
    assert model.get_base_model().config.num_labels == 1


def test_recipe_classification_writes_the_confusion_matrix_and_refuses_float_labels(tmp_path, capsys):
    model = tiny_bert_folder(str(tmp_path / "bert"))
    rows = sentiment_rows(40)
    write_csv(str(tmp_path / "train.csv"), rows[:30])
    write_csv(str(tmp_path / "dev.csv"), rows[30:])
    raw = recipe(
        tmp_path, model=model, train_file=str(tmp_path / "train.csv"), test_file=str(tmp_path / "dev.csv")
    )
    metrics = train_from_recipe(raw)["metrics"]
    assert len(metrics["test_confusion_matrix"]) == 2 and set(metrics["test_per_class"]) == {"0", "1"}
    assert (tmp_path / "run" / "confusion_matrix_test.png").exists()
    assert "classification report (test)" in capsys.readouterr().err
    write_csv(str(tmp_path / "float.csv"), [("good", 0.3), ("bad", 0.9)] * 10)
    with pytest.raises(DataError, match="task: regression"):
        train_from_recipe(
            recipe(
                tmp_path, model=model, train_file=str(tmp_path / "float.csv"), output_dir=str(tmp_path / "f")
            )
        )


def test_every_new_task_is_registered_with_its_recipe_head(tmp_path):
    run = type("Run", (), {"model": tiny_llama_folder(str(tmp_path / "llama")), "generative": False})()
    assert {"qa", "summarization", "translation", "regression", "multi-label"} <= set(TASKS)
    assert TASKS["qa"].model_task(run) == "qa" and TASKS["qa"].adapter_task_type(run) == "QUESTION_ANS"
    assert TASKS["summarization"].model_task(run) == "causal-lm"
    assert TASKS["translation"].adapter_task_type(run) == "CAUSAL_LM"
    run.generative = True
    assert TASKS["qa"].model_task(run) == "causal-lm"
    assert TASKS["regression"].head_kwargs(None)["num_labels"] == 1


def test_every_new_task_predicts_from_json_rows_to_json(tmp_path):
    """What a server does with any task: JSON rows in, JSON out (the generic endpoint calls task.predict)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BertForQuestionAnswering,
        BertForSequenceClassification,
    )

    tok = word_tokenizer()
    folder = tiny_llama_folder(str(tmp_path / "llama"))
    llama_tok, llama = (
        AutoTokenizer.from_pretrained(folder),
        AutoModelForCausalLM.from_pretrained(folder).eval(),
    )
    multi = MultiLabelClassificationTask(tok, labels=LabelMap(["a", "b"]))
    cases = [
        (
            QuestionAnsweringTask(tok),
            tiny_bert(BertForQuestionAnswering),
            '[{"question": "what was dull", "context": "the plot was dull"}]',
        ),
        (
            RegressionTask(tok),
            tiny_bert(BertForSequenceClassification, num_labels=1),
            '[{"text": "good film"}]',
        ),
        (
            multi,
            tiny_bert(BertForSequenceClassification, num_labels=2),
            '[{"text": "good film"}, {"text": "bad"}]',
        ),
        (
            SummarizationTask(llama_tok, "document", "summary", max_new_tokens=2),
            llama,
            '[{"document": "good film"}]',
        ),
        (TranslationTask(llama_tok, max_new_tokens=2), llama, '[{"source": "good film"}]'),
        (GenerativeQATask(llama_tok, max_new_tokens=2), llama, '[{"question": "q", "context": "good film"}]'),
    ]
    for task, model, rows in cases:
        answers = task.predict(model.eval(), json.loads(rows))
        assert len(answers) == len(json.loads(rows)) and json.loads(json.dumps(answers)) == answers
    with pytest.raises(DataError, match="needs 'question' and 'context'"):
        QuestionAnsweringTask(tok).predict(tiny_bert(BertForQuestionAnswering), [{"question": "q"}])
    with pytest.raises(DataError, match="has no 'source'"):
        TranslationTask(llama_tok).predict(llama, [{"text": "x"}])
    with pytest.raises(DataError, match="has no 'text'"):
        multi.predict(cases[2][1], [{"sentence": "good film"}])


def write_jsonl(path, rows):
    with open(path, "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def test_runs_are_served_by_post_v1_predict_with_what_they_fitted(tmp_path):
    """Each whole run (base, adapter, head, fitted thresholds) answers POST /v1/predict as `predict` does; the
    server infers the task from the runs and refuses what the run cannot answer."""
    from fastapi.testclient import TestClient

    from deltatune.apps.serve import ServeSettings, create_app
    from deltatune.apps.serve.app import build_engine
    from deltatune.train.task_inference import infer_task

    model = tiny_bert_folder(str(tmp_path / "bert"))
    tags = [["pos", "film"], ["neg"], [], ["pos"]]
    labelled = [
        {"text": text, "label": tag}
        for text, tag in zip(["good film", "bad plot", "dull", "good plot"] * 3, tags * 3)
    ]
    multi = write_jsonl(tmp_path / "multi.jsonl", labelled)
    qa_rows = [
        {"question": q, "context": c, "answers": {"text": a["text"], "answer_start": a["answer_start"]}}
        for q, c, a in zip(*QA_ROWS.values())
    ] * 3
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    runs = {
        "tags": dict(task="multi-label", train_file=multi, eval_file=multi, eval_overlap="keep"),
        "reader": dict(task="qa", train_file=qa, eval_file=qa, eval_overlap="keep", max_length=32),
    }
    for name, keys in runs.items():
        train_from_recipe(recipe(tmp_path, model=model, output_dir=str(tmp_path / name), **keys))
    saved = {name: yaml.safe_load((tmp_path / name / "run_config.yaml").read_text()) for name in runs}
    assert len(saved["tags"]["thresholds"]) == 3 and "null_threshold" in saved["reader"]
    asks = {
        "tags": [{"text": "good film"}, {"text": "bad plot"}],
        "reader": [{"question": "what was dull", "context": CONTEXT}],
    }
    for name, rows in asks.items():
        folder = str(tmp_path / name)
        task_name, _ = infer_task(None, {name: folder})
        assert task_name == runs[name]["task"]
        engine = build_engine(None, {name: folder}, task_name)
        served_task = engine.runs[name][1]
        if name == "tags":
            assert served_task.thresholds == saved["tags"]["thresholds"]
        else:
            assert served_task.null_threshold == saved["reader"]["null_threshold"]
        cli_model, cli_task, _ = load_run(folder)  # what `deltatune predict` loads
        expected = json.loads(json.dumps(cli_task.predict(cli_model, rows)))
        with TestClient(create_app(engine, ServeSettings(max_batch_size=4))) as client:
            reply = client.post("/v1/predict", json={"adapter": name, "rows": rows})
            assert reply.status_code == 200, reply.text
            assert reply.json()["results"] == expected
            assert client.post("/v1/predict", json={"adapter": name, "rows": [{"x": "y"}]}).status_code == 400
            assert client.post("/v1/predict", json={"adapter": "nope", "rows": rows}).status_code == 404
            assert client.post("/v1/predict", json={"adapter": name, "rows": rows * 5}).status_code == 413
            assert client.post("/v1/classify", json={"inputs": "good", "adapter": name}).status_code == 400
    with pytest.raises(ValueError, match="drop --model"):
        build_engine(model, {"tags": str(tmp_path / "tags")}, "multi-label")
