# Sourced by the end-to-end scripts: `e2e_venv DIR PACKAGE==VERSION...` makes (or reuses) a
# Python venv at DIR with exactly those pinned packages, installing Debian's python3-venv
# first when python3 cannot make one.
e2e_venv() {
  local venv="$1"
  shift
  local want="$*"
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      local sudo=""
      if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
      export DEBIAN_FRONTEND=noninteractive
      $sudo apt-get update -qq
      $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    else
      echo "$(basename "$0"): python3 cannot make a venv (install the venv module)" >&2
      exit 1
    fi
  fi
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.e2e-packages" 2>/dev/null)" != "$want" ]; then
    echo "== venv $venv ($want)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086 # one argument per package
    "$venv/bin/python" -m pip install -q --disable-pip-version-check $want
    echo "$want" >"$venv/.e2e-packages"
  fi
}
