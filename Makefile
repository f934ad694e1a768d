# Set-up and the two README commands: `make test` and `make demo`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo clean

venv: $(STAMP)

# Reinstall only when the requirement files or setup.py change, so a second run is fast.
$(STAMP): requirements.txt requirements-test.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# `make demo`: render and prepare the synthetic set (once), train a ResNet-18 from scratch on the CPU,
# then test with re-ranking: prints the results table, writes metrics.json and ranked-list pictures.
# Everything goes under demo_out/; a second run re-trains on the same set.
DEMO := demo_out
DEMO_TRAIN := --base_model resnet18 --resize_h_w 64 32 --pretrained false --ids_per_batch 16 --ims_per_id 4 \
	--base_lr 1e-3 --total_epochs 40 --exp_decay_at_epoch 25 -glw 1 -llw 1 -idlw 1 --workers 2

$(DEMO)/synthetic/partitions.pkl: | $(STAMP)
	$(PY) data_set/synthetic_prepare.py --save_dir $(DEMO)/synthetic --workers 2 --overwrite

demo: $(STAMP) $(DEMO)/synthetic/partitions.pkl
	rm -rf $(DEMO)/exp
	$(PY) script/train.py --train_dataset synthetic --train_partitons $(DEMO)/synthetic/partitions.pkl \
		--exp_dir $(DEMO)/exp $(DEMO_TRAIN) --final_test false
	$(PY) script/test.py --train_dataset synthetic --exp_dir $(DEMO)/exp \
		--test_partitons $(DEMO)/synthetic/partitions.pkl --test_distance all --to_re_rank true --workers 2 \
		--num_vis_queries 8

clean:
	rm -rf $(VENV) demo_out *.egg-info
