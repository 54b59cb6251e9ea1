"""A peft + transformers Trainer script, unchanged but for the import: LoRA on a sequence classifier.

    python examples/trainer_lora.py --model <model folder or hub name> \
        --train ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv --max-steps 200

The data are TSV files with `sentence` and `label` columns (SST-2's layout). Every checkpoint and the final folder
hold a peft-format adapter (adapter_config.json + adapter_model.safetensors + README.md) that peft loads as well.
"""

import argparse

import numpy as np
from datasets import load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    set_seed,
)

import deltatune as peft  # the only line that differs from the peft version of this script


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--output-dir", default="outputs/trainer-lora")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--resume", default=None, help="a checkpoint folder to continue from")
    args = parser.parse_args(argv)

    set_seed(0)  # the adapter's initial weights are drawn at random
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_dataset("csv", data_files={"train": args.train, "eval": args.eval}, delimiter="\t")
    data = data.map(lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=64), batched=True)

    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=16)  # default target modules
    model = peft.get_peft_model(model, config)
    model.print_trainable_parameters()

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        logging_steps=1,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        report_to=[],
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    trainer.train(resume_from_checkpoint=args.resume)
    metrics = trainer.evaluate()
    trainer.save_model(args.output_dir)
    print(metrics)
    return trainer, metrics


if __name__ == "__main__":
    main()
