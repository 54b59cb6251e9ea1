"""Where deltatune meets the libraries peft users already work with (transformers' Trainer, trl, diffusers):
thin, each tested against the real library."""
