#!/usr/bin/env bash
# Creates ./.venv and installs coautogen-fl (editable, with test extras) into it.
# Idempotent: re-installs only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
stamp=.venv/.coautogen-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing coautogen-fl and its dependencies into .venv (a few minutes the first time)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    # constraints.txt pins the torch/torchvision pair and the flwr release that install here.
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
    echo "$want" > "$stamp"
fi
# Headless Chromium (Debian's chromium package) renders the run report in tests/test_report.py.
# Tried once per .venv: a machine that cannot install it is not asked again on every run.
chromium_stamp=.venv/.coautogen-chromium-tried
if [ ! -x /usr/bin/chromium ] && [ ! -f "$chromium_stamp" ]; then
    touch "$chromium_stamp"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing chromium with apt-get (renders the run report in tests/test_report.py)"
        install_chromium() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }
        # A fresh machine may have no package lists yet: update once, only if the first try fails.
        if ! install_chromium && ! { apt-get update -qq >/dev/null 2>&1 && install_chromium; }; then
            echo "setup: could not install chromium with apt-get; tests/test_report.py skips its rendering check"
        fi
    else
        echo "setup: no /usr/bin/chromium and no apt-get as root to install it; tests/test_report.py skips its" \
             "rendering check (install Debian's chromium package to run it)"
    fi
fi
