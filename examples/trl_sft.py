"""A peft + trl SFTTrainer script, unchanged but for the import: LoRA instruction tuning of a causal LM.

    python examples/trl_sft.py --model <causal LM folder or hub name> --train ../shared/data/sst2/train.tsv

The data are a TSV file whose `sentence` column is the text to learn. The output folder holds a peft-format
adapter that peft loads as well.
"""

import argparse

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer

import deltatune as peft  # the only line that differs from the peft version of this script


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--output-dir", default="outputs/trl-sft")
    parser.add_argument("--max-steps", type=int, default=100)
    args = parser.parse_args(argv)

    set_seed(0)  # the adapter's initial weights are drawn at random
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_dataset("csv", data_files={"train": args.train}, delimiter="\t")["train"]

    model = AutoModelForCausalLM.from_pretrained(args.model)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    model.print_trainable_parameters()

    config = SFTConfig(
        output_dir=args.output_dir,
        dataset_text_field="sentence",
        max_steps=args.max_steps,
        max_length=64,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        bf16=torch.cuda.is_available(),
        report_to=[],
        seed=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
