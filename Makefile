# The two commands of the README. Each creates .venv on first use and reinstalls it when
# pyproject.toml changes (the stamp file records the last install).

PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: test demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev]'
	touch $(STAMP)

# The whole test suite. Tests on the real data run when FNGD_DATA_DIR is set.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# ResNet-32 with SGD-m on 5,000 CIFAR-10 images for 3 epochs (a few minutes on a CPU).
# Data: FNGD_DATA_DIR when set, else ../shared/data when it exists, else a download
# into ./datasets.
demo: $(STAMP)
	@if [ -n "$$FNGD_DATA_DIR" ]; then root="$$FNGD_DATA_DIR"; download=false; \
	elif [ -d ../shared/data ]; then root=../shared/data; download=false; \
	else root=./datasets; download=true; fi; \
	echo "Data root: $$root (download=$$download)"; \
	$(VENV)/bin/python -m scripts.train experiment=demo dataset.root="$$root" \
		dataset.download=$$download
