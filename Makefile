# The two commands of the README: `make run` starts the node on its bundled defaults in the runtime
# environment at .venv-run (dxnode alone: ONNX Runtime, no torch); `make test` runs the whole suite
# in the full environment at .venv (dxnode[test]: torch, training and the test tools; `make check`:
# ruff and mypy). Each is created once and reused.
.PHONY: venv venv-run run test check wheel-smoke runtime-smoke bench clean

venv:
	@scripts/ensure-venv

venv-run:
	@scripts/ensure-venv run

run: venv-run
	.venv-run/bin/dxnode serve

test: venv
	.venv/bin/python -m pytest -ra $(PYTEST_ARGS)

# Style, types, sizes (ruff's complexity limits, modules within 450 lines or a reason) and the import layers
# (import-linter's contracts in pyproject.toml; function-local imports say why), run by .ci/run before the tests.
check: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/python scripts/check-module-sizes
	.venv/bin/lint-imports --no-cache
	.venv/bin/python scripts/check-local-imports

# Build the wheel and sdist, install the wheel outside the checkout and run it from an empty folder.
wheel-smoke: venv
	scripts/wheel-smoke

# Install the built wheel with its runtime dependencies only (no torch) and receive a study end to end.
runtime-smoke: venv
	scripts/runtime-smoke

bench: venv
	.venv/bin/python -m bench.receive
	.venv/bin/python -m bench.infer

clean:
	rm -rf var artifacts .pytest_cache
