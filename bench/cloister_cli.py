"""Driving the `cloister` binary from the benchmark scripts: run a command
in an environment with a token, find a token in output, and set up an
environment with a scientist, a reviewer and the bundled plugins approved.
"""

import os
import re
import subprocess
import sys


def sh(bin_, env, *args, token=None):
    """Runs `bin_ args` on environment `env`; exits with its stderr on failure."""
    e = dict(os.environ, CLOISTER_ENV=env)
    if token:
        e["CLOISTER_TOKEN"] = token
    p = subprocess.run([bin_, *args], env=e, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{bin_} {' '.join(args)} failed:\n{p.stderr}")
    return p.stdout + p.stderr


def token(text):
    """The first token (`clt_…`) in `text`."""
    m = re.search(r"clt_[0-9a-f]{64}", text)
    if not m:
        sys.exit(f"no token in:\n{text}")
    return m.group(0)


def setup(bin_, root, init_args=()):
    """A new environment under `root` (`init_args` go to `cloister init`):
    returns (env, admin token, scientist token, {plugin name: approved
    digest})."""
    env = os.path.join(root, "env")
    admin = token(sh(bin_, env, "init", env, *init_args))
    sci = token(sh(bin_, env, "user", "add", "sci", "--role", "scientist", token=admin))
    rev = token(sh(bin_, env, "user", "add", "rev", "--role", "reviewer", token=admin))
    wasm = os.path.join(root, "wasm")
    sh(bin_, env, "plugin", "bundled", "--write", wasm)
    digests = {}
    for f in sorted(os.listdir(wasm)):
        out = sh(bin_, env, "plugin", "add", os.path.join(wasm, f), token=sci)
        d = re.search(r"[0-9a-f]{64}", out).group(0)
        sh(bin_, env, "plugin", "approve", d, token=rev)
        digests[f.removesuffix(".wasm")] = d
    return env, admin, sci, digests
