# The two commands at the top of README.md.
.PHONY: demo test cluster-up cluster-down crds gpu-bundle gpu-check

demo: ## Local cluster up, install kubetune, fine-tune, deploy, query
	./e2e/demo.sh

test: ## Every unit and end-to-end test, against a fresh local cluster
	./e2e/run-tests.sh

cluster-up:
	./e2e/cluster/up.sh

cluster-down:
	./e2e/cluster/down.sh

crds: ## Regenerate crds/generated/*.yaml from the Rust types, and the Helm chart's copy
	cargo run -q -p kubetune-crds --bin kubetune-crdgen
	rm -f charts/kubetune/crds/*.yaml
	cp crds/generated/*.yaml charts/kubetune/crds/

gpu-bundle: ## The CUDA binaries for e2e/gpu/check.sh, built on a CPU machine (.kubetune/gpu-bundle)
	./e2e/gpu/bundle.sh

gpu-check: ## On a GPU machine: correctness, training and serving against PyTorch (e2e/gpu/check.sh)
	./e2e/gpu/check.sh
