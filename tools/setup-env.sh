#!/usr/bin/env bash
# Create (once) the Python environment Cellflow runs in, and link it at .venv.
#
# The environment is cached outside the clone, keyed by the dependency spec (pyproject.toml,
# this script, Python version, CPU architecture), because the torch stack is ~6 GB and takes
# minutes to install: a fresh clone with the same dependencies reuses it in seconds. Override
# the cache folder with CELLFLOW_ENV_CACHE. Safe to rerun: it skips whatever is already done.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
cache=${CELLFLOW_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cellflow/envs}

"$python" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] < (3, 13)))' || {
    echo "setup: Cellflow needs Python 3.10-3.12; $python is $("$python" --version 2>&1)" >&2
    exit 1
}
# The key covers what gets installed: the dependency lists, not the rest of pyproject.toml.
dependency_spec=$(sed -n -e '/^dependencies = \[/,/^\]/p' \
    -e '/^\[project.optional-dependencies\]/,/^\[/p' "$repo/pyproject.toml")
key=$({ echo "$dependency_spec"; cat "$repo/tools/setup-env.sh"; "$python" --version; uname -m; } \
    | sha256sum | cut -c1-16)
env_dir="$cache/$key"

if [ ! -f "$env_dir/.cellflow-complete" ]; then
    echo "setup: creating the environment in $env_dir (first time: a few minutes)"
    rm -rf "$env_dir"
    mkdir -p "$cache"
    "$python" -m venv "$env_dir"
    "$env_dir/bin/python" -m pip install --quiet --upgrade pip "setuptools>=68"
    "$env_dir/bin/python" -m pip install --quiet "$repo[dev]"
    touch "$env_dir/.cellflow-complete"
    # Keep the three most recent environments; older dependency specs are not coming back.
    find "$cache" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn | tail -n +4 \
        | cut -d' ' -f2- | xargs -r rm -rf
fi

# Clones share the environment, so the package is (re)linked to whichever clone runs set-up.
# The check runs from / : from the clone, `import cellflow` would find ./cellflow whatever is
# installed, and a copy from another clone would stay in the environment unnoticed.
if ! (cd / && "$env_dir/bin/python" -c \
    "import sys, cellflow; sys.exit(cellflow.__file__ != sys.argv[1])" \
    "$repo/cellflow/__init__.py" 2>/dev/null); then
    "$env_dir/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$repo"
fi

if [ "$(readlink "$repo/.venv" 2>/dev/null)" != "$env_dir" ]; then
    rm -rf "$repo/.venv"
    ln -s "$env_dir" "$repo/.venv"
fi
echo "setup: environment ready at .venv -> $env_dir"

# `snakemake --profile slurm` finds ./slurm (a link to profiles/slurm) before anything in
# ~/.config/snakemake, so every clone uses its own profile. Earlier set-ups linked one clone's
# profile there for all of them; such a link is removed (a profile of the user's is kept).
profile_home=${XDG_CONFIG_HOME:-$HOME/.config}/snakemake/slurm
if [ -L "$profile_home" ]; then
    target=$(readlink "$profile_home")
    if [[ "$target" == */profiles/slurm ]] && { [ ! -e "$target" ] \
            || [ -e "$target/../../workflow/rules/common.smk" ]; }; then
        rm -f "$profile_home"
    fi
fi
