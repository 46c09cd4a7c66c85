# The two commands of the README: `make run` starts the node on its bundled defaults,
# `make test` runs the whole suite. Both create and reuse the virtual environment at .venv.
.PHONY: venv run test bench clean

venv:
	@scripts/ensure-venv

run: venv
	.venv/bin/dxnode serve

test: venv
	.venv/bin/python -m pytest -ra $(PYTEST_ARGS)

bench: venv
	.venv/bin/python -m bench.receive
	.venv/bin/python -m bench.infer

clean:
	rm -rf var artifacts .pytest_cache
