# The two commands of the README: `make run` starts the node on its bundled defaults,
# `make test` runs the whole suite (`make check`: ruff and mypy). They create and reuse the virtual
# environment at .venv.
.PHONY: venv run test check wheel-smoke bench clean

venv:
	@scripts/ensure-venv

run: venv
	.venv/bin/dxnode serve

test: venv
	.venv/bin/python -m pytest -ra $(PYTEST_ARGS)

# Style and types, run by .ci/run before the tests.
check: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# Build the wheel and sdist, install the wheel outside the checkout and run it from an empty folder.
wheel-smoke: venv
	scripts/wheel-smoke

bench: venv
	.venv/bin/python -m bench.receive
	.venv/bin/python -m bench.infer

clean:
	rm -rf var artifacts .pytest_cache
