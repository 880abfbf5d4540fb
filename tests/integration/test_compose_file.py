"""docker-compose.yml, .env.example and the Dockerfile: valid, consistent and free of secrets.

The text checks need nothing installed. The schema checks run `docker compose config` (or the
standalone `docker-compose`), which needs no Docker engine, and are skipped, with the reason,
when neither is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from dsproxy.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RELAY_CONFIG = ROOT / "deploy" / "relay" / "config.toml"

REQUIRED = ("DSPROXY_MACHINE_PUBKEY", "DSPROXY_TRUSTED_CONTROLLERS", "DSPROXY_TRUSTED_BACKENDS")
# Compose defaults that differ from dsproxy's on purpose: the services of the compose network.
DEPLOYMENT_OVERRIDES = {"DSPROXY_RELAYS", "DSPROXY_SOLANA_RPC_URL"}

SECRET_PATTERNS = {
    "a Nostr secret key (nsec)": r"nsec1[02-9ac-hj-np-z]{20,}",
    "a PEM private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "an API key (sk-...)": r"\bsk-[A-Za-z0-9_-]{16,}",
    "a 64-hex key (dsproxy keygen writes secrets in hex)": r"\b[0-9a-fA-F]{64}\b",
    "a Solana keypair (64 byte values)": r"\[\s*(?:\d{1,3}\s*,\s*){63}\d{1,3}\s*\]",
}
# Any $NAME or ${NAME...} that compose interpolates; $$ is compose's escaped dollar.
VARIABLE = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|([A-Za-z_][A-Za-z0-9_]*))")
DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?-([^}]*)\}")
ASSIGNMENT = re.compile(r"^\s*-?\s*\"?([A-Za-z_][A-Za-z0-9_]*)\"?\s*[:=][ \t]*(.*?)\s*$")
FAKE_KEY = "ab" * 32


def _compose_variables() -> set[str]:
    text = COMPOSE_FILE.read_text()
    return {braced or bare for braced, bare in VARIABLE.findall(text)}


def _env_example() -> dict[str, str]:
    lines = ENV_EXAMPLE.read_text().splitlines()
    matches = (re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line) for line in lines)
    return {match[1]: match[2] for match in matches if match}


def _compose_defaults() -> dict[str, str]:
    defaults: dict[str, str] = {}
    for name, value in DEFAULT.findall(COMPOSE_FILE.read_text()):
        assert defaults.setdefault(name, value) == value, f"${{{name}}} has two defaults"
    return defaults


def _succeeds(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def compose() -> list[str]:
    """The compose command: the `docker compose` plugin, else the standalone `docker-compose`."""
    docker = shutil.which("docker")
    if docker and _succeeds([docker, "compose", "version"]):
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone and _succeeds([standalone, "version"]):
        return [standalone]
    pytest.skip(
        "Docker Compose is not installed: `docker compose version` fails"
        + (" (the docker CLI has no compose plugin)" if docker else " (no docker CLI)")
        + " and there is no docker-compose; `apt-get install docker-compose` provides one"
    )


def _run_config(compose: list[str], extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DSPROXY_", "COMPOSE_"))
    }
    env.update(extra_env)
    command = [*compose, "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "config", "-q"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_compose_accepts_the_file_with_env_example_and_the_required_keys(compose):
    """`docker compose config` validates the schema and the interpolation; no engine needed."""
    result = _run_config(compose, {name: FAKE_KEY for name in REQUIRED})
    assert result.returncode == 0, f"{' '.join(compose)} config failed:\n{result.stderr}"


@pytest.mark.parametrize("missing", REQUIRED)
def test_compose_refuses_to_start_and_names_a_missing_required_key(compose, missing):
    result = _run_config(compose, {name: FAKE_KEY for name in REQUIRED if name != missing})
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr, result.stderr


def test_every_compose_variable_is_listed_in_env_example():
    missing = sorted(_compose_variables() - set(_env_example()))
    assert not missing, f"docker-compose.yml uses {missing}; add them to .env.example"


def test_env_example_lists_no_variable_that_compose_ignores():
    listed = {name for name in _env_example() if not name.startswith("COMPOSE_")}
    unused = sorted(listed - _compose_variables())
    assert not unused, f".env.example lists {unused}, which docker-compose.yml never reads"


def test_env_example_values_match_the_compose_defaults():
    defaults = _compose_defaults()
    for name, value in _env_example().items():
        if value and name in defaults:
            assert value == defaults[name], (name, value, defaults[name])


def test_compose_defaults_are_dsproxy_defaults():
    """A default repeated in the compose file must not drift from dsproxy/config.py."""
    builtin = load_settings(environ={})
    for name, value in _compose_defaults().items():
        if not name.startswith("DSPROXY_") or name in DEPLOYMENT_OVERRIDES:
            continue
        field = name.removeprefix("DSPROXY_").lower()
        assert hasattr(builtin, field), f"docker-compose.yml sets {name}: not a dsproxy setting"
        assert getattr(load_settings(environ={name: value}), field) == getattr(builtin, field), (
            f"docker-compose.yml defaults {name} to {value!r}, dsproxy to "
            f"{getattr(builtin, field)!r}"
        )


@pytest.mark.parametrize(
    "path", [COMPOSE_FILE, ENV_EXAMPLE, DOCKERFILE, RELAY_CONFIG], ids=lambda path: path.name
)
def test_deployment_files_hold_no_secret(path):
    text = path.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        match = re.search(pattern, text)
        assert match is None, f"{path.name} holds {what}: {match and match.group()[:12]}..."
    for line in text.splitlines():
        assignment = ASSIGNMENT.match(line)
        if assignment is None or line.lstrip().startswith("#"):
            continue
        name, value = assignment.groups()
        if re.search(r"API_KEY|SECRET|PASSWORD|PRIVATE", name, re.I) and not name.endswith("_FILE"):
            assert value in ("", '""') or value.startswith("${"), f"{path.name}: {line.strip()}"


def test_upstream_api_key_reaches_the_backend_only_as_a_file():
    """A key in the environment shows in `docker inspect`; a read-only file does not."""
    text = COMPOSE_FILE.read_text()
    assert re.search(r"DSPROXY_UPSTREAM_API_KEY(?!_FILE)", text) is None
    assert "DSPROXY_UPSTREAM_API_KEY_FILE: /keys/upstream_api_key" in text


def test_keys_are_mounted_read_only_and_every_key_file_is_under_keys():
    text = COMPOSE_FILE.read_text()
    mounts = re.findall(r"^\s*-\s*(\S+:/keys\S*)\s*$", text, re.M)
    assert mounts, "no volume is mounted on /keys"
    assert all(mount.endswith(":ro") for mount in mounts), mounts
    key_files = re.findall(r"DSPROXY_\w+_FILE:\s*(\S+)", text)
    assert key_files and all(path.startswith("/keys/") for path in key_files), key_files


def test_dockerfile_copies_no_keys_env_or_whole_context():
    instructions = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    for instruction in instructions:
        words = instruction.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        if any(word.startswith("--from=") for word in words):
            continue  # from another build stage, not from the context
        sources = [word for word in words[1:-1] if not word.startswith("--")]
        for source in sources:
            assert source not in (".", "./", "*"), f"copies the whole build context: {instruction}"
            assert not re.search(r"keys|\.env|\.nostr|secret|\.sqlite", source), instruction


def test_dockerignore_admits_only_listed_files_and_never_keys_or_env():
    rules = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert rules[0] == "*", "the .dockerignore should exclude everything, then allow files"
    readmitted = [rule for rule in rules if rule.startswith("!")]
    assert not [rule for rule in readmitted if re.search(r"keys|\.env|\.nostr|data", rule)]


def test_relay_config_allows_kind_1573_events_with_full_content():
    limits = tomllib.loads(RELAY_CONFIG.read_text())["limits"]
    assert limits["event_kind_allowlist"] == [1573]
    content_bytes_max = load_settings(environ={}).content_bytes_max
    # The relay measures the whole EVENT message: content plus id, keys, tags and escaping.
    assert limits["max_event_bytes"] >= content_bytes_max + 1024
    assert limits["max_ws_message_bytes"] >= limits["max_event_bytes"]
    assert limits["max_ws_frame_bytes"] >= limits["max_event_bytes"]
