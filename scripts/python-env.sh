#!/bin/sh
# Creates (or reuses) the project's Python environment in .venv, with the worker package
# installed in editable mode and the test requirements. Idempotent: pip runs only when
# the requirements or the package metadata changed. Prints the interpreter's path.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
venv="${SNAKEPOOL_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.snakepool-stamp"

want=$(cat "$root/python/pyproject.toml" "$root/clients/python/pyproject.toml" "$root"/python/requirements-*.txt | cksum)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$venv/bin/python"
  exit 0
fi

echo "setting up the Python environment in $venv" >&2
"$python" -m venv "$venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
for req in "$root"/python/requirements-*.txt; do
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
done
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root/python" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root/clients/python" >&2
echo "$want" > "$stamp"
echo "$venv/bin/python"
