"""The bash scripts that `tpu_pod` runs on every TPU worker through `gcloud ... ssh --command`.

Each is run by the worker's login shell (bash); its first line names it. Values from the user
are shell-quoted here, so that spaces, quotes and `$` arrive unchanged.
"""

from __future__ import annotations

import shlex

PROG = "tpu_pod.sh"
# Fixed locations on each TPU worker (relative to the login user's $HOME).
SRC_DIR = "resnet-multihost"
VENV = "resnet-venv"
LOG = "resnet-train.log"
EXITCODE = "resnet-train.exitcode"
TARBALL = "resnet-src.tar.gz"
URL_FILE = ".resnet-repo-url"  # a --repo-url with credentials, read once by setup and deleted
# Matches the launcher process (`python -m launch.main ...`) but not the shells that start,
# check or stop it (their command lines start with `bash`).
LAUNCHER_PATTERN = "^[^ ]*python[^ ]* -m launch[.]main( |$)"
# Each worker answers the status check with one line: this tag, then `running`, the launcher's
# last exit status, or `none`, then its hostname.
CHECK_TAG = "tpu_pod-launcher:"
# uv, used by setup only when the image has no Python >= 3.11: a pinned release, installed into
# ~/.local/bin without touching any shell profile.
UV_VERSION = "0.9.26"


def has_credentials(url: str) -> bool:
    """scheme://user:secret@host/...: never printed, never on a command line."""
    if "://" not in url:
        return False
    return "@" in url.split("://", 1)[1].split("/", 1)[0]


def _split_url(url: str) -> tuple[str, str, str]:
    scheme, rest = url.split("://", 1)
    authority = rest.split("/", 1)[0]
    return scheme, authority.rsplit("@", 1)[-1], rest[len(authority) :]


def public_url(url: str) -> str:
    """The URL without its user information."""
    if not has_credentials(url):
        return url
    scheme, host, path = _split_url(url)
    return f"{scheme}://{host}{path}"


def shown_url(url: str) -> str:
    """The URL with its user information masked."""
    if not has_credentials(url):
        return url
    scheme, host, path = _split_url(url)
    return f"{scheme}://***@{host}{path}"


def _fetch(repo_url: str, ref: str) -> str:
    if not repo_url:
        return f'mkdir -p "$src.new"\ntar -xzf {TARBALL} -C "$src.new"\nrm -f {TARBALL}'
    # GIT_TERMINAL_PROMPT=0: a repository that needs credentials fails at once instead of
    # waiting for a password. git's errors are shown with any user:secret@ part masked.
    if has_credentials(repo_url):
        lines = [f'url=$(cat "$HOME/{URL_FILE}")', f'rm -f "$HOME/{URL_FILE}"']
    else:
        lines = [f"url={shlex.quote(repo_url)}"]
    lines += [
        'if ! GIT_TERMINAL_PROMPT=0 git clone --quiet "$url" "$src.new" 2>"$src.err"; then',
        "  sed 's#://[^/@]*@#://***@#g' \"$src.err\" >&2",
        '  rm -f "$src.err"',
        "  exit 1",
        "fi",
        'rm -f "$src.err"',
        f'git -C "$src.new" remote set-url origin {shlex.quote(public_url(repo_url))}',
    ]
    if ref:
        lines.append(f'git -C "$src.new" checkout --quiet {shlex.quote(ref)}')
    return "\n".join(lines)


def setup(repo_url: str, ref: str, python_version: str) -> str:
    """Unpacks or clones the project into ~/resnet-multihost and installs it into a venv."""
    return f"""# {PROG}:setup
set -euo pipefail
cd "$HOME"
src={SRC_DIR}
venv=$HOME/{VENV}
rm -rf "$src.new"
{_fetch(repo_url, ref)}
rm -rf "$src"
mv "$src.new" "$src"
if ! {{ [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; }}; then
  rm -rf "$venv"
  made=0
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      if "$py" -m venv "$venv" >/dev/null 2>&1; then made=1; break; fi
      rm -rf "$venv"
    fi
  done
  if [ "$made" = 0 ]; then
    echo "$(hostname): no usable Python >= 3.11; installing Python {python_version} with uv {UV_VERSION}"
    uv=$(command -v uv || echo "$HOME/.local/bin/uv")
    if [ ! -x "$uv" ]; then
      # Pinned release; UV_UNMANAGED_INSTALL puts the binary in ~/.local/bin and
      # leaves shell profiles alone (UV_NO_MODIFY_PATH likewise).
      curl -LsSf https://astral.sh/uv/{UV_VERSION}/install.sh |
        env UV_UNMANAGED_INSTALL="$HOME/.local/bin" UV_NO_MODIFY_PATH=1 sh
      uv=$HOME/.local/bin/uv
    fi
    "$uv" venv --seed --python {python_version} "$venv"
  fi
fi
cd "$src"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install ".[tpu]"
echo "$(hostname): setup done ($("$venv/bin/python" -c 'import jax; print("jax", jax.__version__)'))"
"""  # noqa: E501


def train(launcher_args: list[str], env: list[tuple[str, str]]) -> str:
    """Starts the launcher under nohup; it writes its exit status to ~/resnet-train.exitcode."""
    qargs = "".join(" " + shlex.quote(a) for a in launcher_args)
    exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env)
    keys = "".join(" " + key for key, _ in env)
    named = f" (environment:{keys})" if keys else ""
    setup_first = f"run '{PROG} setup' first"
    return f"""# {PROG}:train
cd "$HOME/{SRC_DIR}" 2>/dev/null || {{ echo "$(hostname): ~/{SRC_DIR} not found; {setup_first}" >&2; exit 1; }}
[ -f "$HOME/{VENV}/bin/activate" ] || {{ echo "$(hostname): ~/{VENV} not found; {setup_first}" >&2; exit 1; }}
if pgrep -f '{LAUNCHER_PATTERN}' >/dev/null; then echo "$(hostname): the launcher is already running; use '{PROG} stop' first" >&2; exit 1; fi
. "$HOME/{VENV}/bin/activate"
{exports}rm -f "$HOME/{EXITCODE}"
rm -f /tmp/libtpu_lockfile 2>/dev/null || true
{{ printf '=== %s %s: python -m launch.main' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(hostname)"; printf ' %s'{qargs}; echo '{named}'; }} >> "$HOME/{LOG}"
PYTHONUNBUFFERED=1 nohup bash -c 'python -m launch.main "$@" < /dev/null; echo $? > "$HOME/{EXITCODE}"' resnet-train{qargs} >> "$HOME/{LOG}" 2>&1 < /dev/null &
echo "$(hostname): launcher started, logging to ~/{LOG}"
"""  # noqa: E501


def check() -> str:
    """One line per worker; always exits 0, so a failed ssh call is ssh's or gcloud's problem."""
    return f"""# {PROG}:check
if pgrep -f '{LAUNCHER_PATTERN}' >/dev/null; then echo "{CHECK_TAG} running $(hostname)"; exit 0; fi
code=$(cat "$HOME/{EXITCODE}" 2>/dev/null || true)
echo "{CHECK_TAG} ${{code:-none}} $(hostname)"
"""


def stop(timeout: int) -> str:
    """SIGTERM (the launcher checkpoints and exits 75), SIGKILL after `timeout` seconds."""
    return f"""# {PROG}:stop
pat='{LAUNCHER_PATTERN}'
if ! pgrep -f "$pat" >/dev/null; then echo "$(hostname): launcher not running"; exit 0; fi
pkill -TERM -f "$pat" || true
echo "$(hostname): sent SIGTERM; waiting up to {timeout}s for the checkpoint"
i=0
while pgrep -f "$pat" >/dev/null; do
  if [ "$i" -ge {timeout} ]; then
    echo "$(hostname): still running after {timeout}s; sending SIGKILL" >&2
    pkill -KILL -f "$pat" || true
    exit 1
  fi
  sleep 1
  i=$((i + 1))
done
echo "$(hostname): launcher stopped"
"""


def log(lines: int) -> str:
    return f"""# {PROG}:log
if [ -f "$HOME/{LOG}" ]; then tail -n {lines} "$HOME/{LOG}"; else echo "$(hostname): no ~/{LOG} yet"; fi
"""  # noqa: E501


def follow() -> str:
    return f'tail -n 200 -F "$HOME/{LOG}"'


def parse_check(output: str) -> list[str]:
    """The launcher state of each worker from the check script's output."""
    answers = []
    for line in output.splitlines():
        if line.startswith(CHECK_TAG + " "):
            answers.append(line[len(CHECK_TAG) + 1 :].split(" ", 1)[0])
    return answers
