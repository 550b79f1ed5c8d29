"""The deployment files (Dockerfile, docker-compose.yml, k8s/) checked with real parsers.

No Docker engine or Kubernetes API server runs here or in CI, so these files cannot be
exercised as a whole. Instead every claim they make is checked against something real:

- docker-compose.yml against the Compose JSON schema (vendored from the PyPI package
  docker-compose 1.29.2, compose/config/compose_spec.json, unmodified);
- k8s/*.yaml against the Kubernetes v1.30 strict JSON schemas (a subset vendored from the
  PyPI package kubernetes-validate 1.37.0, see the file's $comment);
- environment variable names against the settings table (dataflow/settings.py, every
  variable the package reads) and the names bytewax.run reads;
- the values against `Config.from_env`, `dataflow.run.recovery_args` and bytewax.run's own
  argument parser;
- the HEALTHCHECK command and the k8s init container script by running them;
- the recovery-partition layout the init script makes by handing it to Bytewax.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from dataflow import settings

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
K8S = ROOT / "k8s"

COMPOSE_SCHEMA_SHA256 = "0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac"
RECOVERY_PATH = "/var/lib/search-features/recovery"
METRICS_PORT = 3030
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


# --- names the code reads ---------------------------------------------------------------


def _bytewax_env_names() -> set[str]:
    """Names bytewax.run reads (the quoted BYTEWAX_* strings of its source) and the two the
    Rust side reads for the metrics server (checked to be present in the compiled module)."""
    import bytewax.run

    source = Path(bytewax.run.__file__).read_text()
    names = set(re.findall(r"[\"'](BYTEWAX_[A-Z_]+)[\"']", source))
    native = b"".join(
        p.read_bytes() for p in Path(bytewax.run.__file__).parent.glob("_bytewax*.so")
    )
    for name in ("BYTEWAX_DATAFLOW_API_ENABLED", "BYTEWAX_DATAFLOW_API_PORT"):
        if name.encode() in native:
            names.add(name)
    return names


@functools.cache
def known_env_names() -> frozenset[str]:
    return frozenset(settings.BY_NAME) | _bytewax_env_names()


def secret_env_names() -> set[str]:
    return {row.name for row in settings.SETTINGS if row.secret}


def test_known_names_are_the_settings_table_and_what_bytewax_reads() -> None:
    known = known_env_names()
    for name in (
        "KAFKA_BROKERS",
        "KAFKA_SASL_PASSWORD",
        "REDIS_URL",
        "OPENSEARCH_PASSWORD",
        "FEATURE_SHARDS",
        "SMOOTHING_DOC_ALPHA",
        "SMOOTHING_ACQ_BETA",
        "LOG_FORMAT",
        "RECOVERY_DIR",
        "RECOVERY_PARTITIONS",
        "SNAPSHOT_INTERVAL_SECONDS",
        "METRICS_ENABLED",
        "BYTEWAX_POD_NAME",
        "BYTEWAX_STATEFULSET_NAME",
        "BYTEWAX_HOSTFILE_PATH",
        "BYTEWAX_WORKERS_PER_PROCESS",
        "BYTEWAX_RECOVERY_DIRECTORY",
        "BYTEWAX_DATAFLOW_API_PORT",
        "BYTEWAX_DATAFLOW_API_ENABLED",
    ):
        assert name in known, name
    assert "SMOOTHING_XYZ_ALPHA" not in known
    assert "BYTEWAX_REPLICAS" not in known  # read by old Bytewax images, not by 0.21 run.py
    assert {"REDIS_URL", "KAFKA_SASL_PASSWORD", "OPENSEARCH_PASSWORD"} <= secret_env_names()


# --- Dockerfile -------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped, as
    Docker's parser does (comment lines inside a continuation are removed too)."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        if logical:
            keyword, _, args = logical.partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, "dangling line continuation at the end of the Dockerfile"
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if keyword == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append((keyword, args))
    return stages


def _last(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [args for kw, args in stage if kw == keyword]
    assert found, f"no {keyword} in the final stage"
    return found[-1]


def _healthcheck_command(args: str) -> list[str]:
    options, sep, command = args.partition("CMD ")
    assert sep, "HEALTHCHECK without CMD"
    assert all(o.startswith("--") for o in options.split()), options
    cmd = json.loads(command)
    assert isinstance(cmd, list), "HEALTHCHECK CMD must be exec form (no shell needed)"
    return cmd


def test_dockerfile_is_python_312_slim_and_knows_every_instruction() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 1
    valid = {
        "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
        "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
    }  # fmt: skip
    for stage in stages:
        base = stage[0][1].split()[0]
        assert base.startswith("python:3.12-slim"), base
        for keyword, _ in stage:
            assert keyword in valid, keyword


def test_dockerfile_runs_as_a_numeric_non_root_user_that_matches_the_pod() -> None:
    final = dockerfile_stages()[-1]
    user, _, group = _last(final, "USER").partition(":")
    assert user.isdigit() and int(user) != 0, "USER must be a numeric uid != 0 (runAsNonRoot)"
    pod = load_k8s()["StatefulSet"]["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == int(user)
    assert pod["fsGroup"] == int(group or user)


def test_dockerfile_entrypoint_is_the_run_wrapper() -> None:
    final = dockerfile_stages()[-1]
    assert json.loads(_last(final, "ENTRYPOINT")) == ["python", "-m", "dataflow.run"]
    # A CMD would be appended to every `docker run IMAGE ARGS` as bytewax.run flags.
    assert not [args for kw, args in final if kw == "CMD"]
    import dataflow.run

    assert callable(dataflow.run.main)


def test_dockerfile_installs_the_package_without_dev_extras() -> None:
    stages = dockerfile_stages()
    runs = " ".join(args for stage in stages for kw, args in stage if kw == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "the package is installed with `pip install .`"
    assert "[dev]" not in runs and "pytest" not in runs
    final = stages[-1]
    copies = [args for kw, args in final if kw == "COPY"]
    assert any(c.startswith("--from=") and "/opt/venv" in c for c in copies)
    env = " ".join(args for kw, args in final if kw == "ENV")
    assert "PATH=/opt/venv/bin:" in env
    # The image's interpreter must satisfy requires-python.
    image_python = dockerfile_stages()[-1][0][1].split()[0].split(":")[1].split("-")[0]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(f"{image_python}.0")


def test_dockerfile_exposes_metrics_and_declares_the_recovery_volume() -> None:
    final = dockerfile_stages()[-1]
    exposed = {int(p.split("/")[0]) for kw, args in final if kw == "EXPOSE" for p in args.split()}
    assert METRICS_PORT in exposed
    assert RECOVERY_PATH in json.loads(_last(final, "VOLUME"))
    runs = " ".join(args for kw, args in final if kw == "RUN")
    assert f"mkdir -p {RECOVERY_PATH}" in runs, "create it so a fresh volume gets the owner"
    assert "chown" in runs


class _Metrics(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        code = self.status if self.path == "/metrics" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"# metrics\n")

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _serve(status: int) -> Iterator[int]:
    handler = type("Handler", (_Metrics,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _run_healthcheck(cmd: list[str], port: int) -> int:
    assert cmd[0] == "python"
    env = {**os.environ, "BYTEWAX_DATAFLOW_API_PORT": str(port)}
    result = subprocess.run(
        [sys.executable, *cmd[1:]], check=False, env=env, capture_output=True, timeout=30
    )
    return result.returncode


def test_healthcheck_passes_only_when_the_metrics_endpoint_answers() -> None:
    cmd = _healthcheck_command(_last(dockerfile_stages()[-1], "HEALTHCHECK"))
    with _serve(200) as port:
        assert _run_healthcheck(cmd, port) == 0
    with _serve(500) as port:
        assert _run_healthcheck(cmd, port) != 0
    # The server is shut down now: nothing listens on `port`.
    assert _run_healthcheck(cmd, port) != 0


# --- .dockerignore / build context ------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """moby/patternmatcher's translation of one pattern to a regex."""
    out = "^"
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern[i + 1 : i + 2] == "*":
                i += 1
                if pattern[i + 1 : i + 2] == "/":
                    i += 1
                if i + 1 >= len(pattern):
                    out += ".*"
                else:
                    out += "(.*/)?"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch in ".+()|{}$^":
            out += "\\" + ch
        else:
            out += ch
        i += 1
    return re.compile(out + "$")


def build_context_includes(path: str) -> bool:
    """Whether `path` (relative, '/'-separated) is sent to the Docker build."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line[1:] if negate else line).lstrip("/")
        rules.append((negate, _dockerignore_regex(pattern)))
    excluded = False
    parts = path.split("/")
    for negate, regex in rules:
        match = bool(regex.match(path)) or any(
            regex.match("/".join(parts[:n])) for n in range(1, len(parts))
        )
        if match:
            excluded = not negate
    return not excluded


def test_dockerignore_matcher_follows_docker_semantics() -> None:
    assert _dockerignore_regex("*").match("README.md")
    assert not _dockerignore_regex("*").match("a/b")
    assert _dockerignore_regex("**/__pycache__").match("dataflow/sinks/__pycache__")
    assert _dockerignore_regex("**/*.py[cod]").match("x.pyc")


def test_build_context_has_what_the_dockerfile_copies_and_nothing_heavy() -> None:
    build = dockerfile_stages()[0]
    sources = []
    for keyword, args in build:
        if keyword in ("COPY", "ADD") and not args.startswith("--from"):
            sources += shlex.split(args)[:-1]
    assert {"pyproject.toml", "setup.py", "README.md", "dataflow"} <= set(sources)
    assert build_context_includes("dataflow/core/_native.c")
    assert not build_context_includes("dataflow/core/_native.cpython-312-x86_64-linux-gnu.so")
    runs = " ".join(args for kw, args in build if kw == "RUN")
    # The compiled core is built in the image, by a compiler the build stage installs.
    assert "gcc" in runs and "import dataflow.core._native" in runs
    for src in sources:
        assert (ROOT / src).exists(), src
        assert build_context_includes(src), f"{src} is excluded by .dockerignore"
    for module in (ROOT / "dataflow").rglob("*.py"):
        assert build_context_includes(module.relative_to(ROOT).as_posix()), module
    for heavy in (
        ".venv/bin/python",
        ".git/HEAD",
        ".stack/dist/kafka/jars/kafka.jar",
        ".recovery/part-0.sqlite3",
        "tests/deploy/test_deploy_files.py",
        "dataflow/__pycache__/flow.cpython-312.pyc",
        "search_features.egg-info/PKG-INFO",
        "docker-compose.yml",
        "k8s/statefulset.yaml",
    ):
        assert not build_context_includes(heavy), heavy


# --- docker-compose.yml -----------------------------------------------------------------


@functools.cache
def _parsed_compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def load_compose() -> dict[str, Any]:
    return copy.deepcopy(_parsed_compose())


_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
_PORTS = re.compile(
    r"^((\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):)?((\d+(-\d+)?)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?$"
)


def _compose_validator() -> jsonschema.Draft201909Validator:
    raw = (DATA / "compose_spec.json").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == COMPOSE_SCHEMA_SHA256, "vendored schema changed"
    checker = jsonschema.FormatChecker()
    checker.checks("duration")(lambda v: not isinstance(v, str) or bool(_DURATION.match(v)))
    checker.checks("ports")(lambda v: not isinstance(v, str) or bool(_PORTS.match(v)))
    return jsonschema.Draft201909Validator(json.loads(raw), format_checker=checker)


def test_compose_file_matches_the_compose_schema() -> None:
    validator = _compose_validator()
    compose = load_compose()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # The schema and the format checks are live: a typo and a bad duration are caught.
    broken = load_compose()
    broken["services"]["pipeline"]["helthcheck"] = {}
    broken["services"]["redis"]["healthcheck"]["interval"] = "5 seconds"
    assert len(list(validator.iter_errors(broken))) == 2


def test_every_service_has_a_pinned_image_or_a_build() -> None:
    services = load_compose()["services"]
    assert {"kafka", "kafka-init", "redis", "opensearch", "prometheus", "pipeline"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" not in service:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
    assert services["kafka"]["image"].startswith("apache/kafka:3.9.")
    assert services["redis"]["image"] == "redis:7"
    assert services["opensearch"]["image"].startswith("opensearchproject/opensearch:2.19.")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["pipeline"]["build"]["dockerfile"] == "Dockerfile"
    assert (ROOT / services["pipeline"]["build"]["context"] / "Dockerfile").is_file()


def test_dependencies_exist_and_wait_for_health_or_completion() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        for dep, rule in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dep] or dep == "pipeline", dep
    assert services["pipeline"]["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "kafka-init": {"condition": "service_completed_successfully"},
        "redis": {"condition": "service_healthy"},
        "opensearch": {"condition": "service_healthy"},
    }
    opensearch = services["opensearch"]["environment"]
    assert opensearch["DISABLE_SECURITY_PLUGIN"] == "true"
    assert opensearch["DISABLE_INSTALL_DEMO_CONFIG"] == "true"
    assert opensearch["discovery.type"] == "single-node"
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"


def _pipeline_env() -> dict[str, str]:
    env = load_compose()["services"]["pipeline"]["environment"]
    assert all(isinstance(v, str) for v in env.values()), "quote values: they are env strings"
    return env


def test_pipeline_environment_uses_only_names_the_code_reads() -> None:
    unknown = set(_pipeline_env()) - known_env_names()
    assert unknown == set()


def test_every_state_shard_count_is_pinned_in_compose_and_k8s() -> None:
    # Shard counts key the recovered state: a deployment must not silently take a default
    # that a later code change could move. The table's state-layout section lists them.
    shard_settings = {row.name for row in settings.SETTINGS if row.section == settings.STATE}
    assert {"FEATURE_SHARDS", "DEDUP_SHARDS", "LINK_SHARDS"} <= shard_settings
    assert shard_settings <= set(_pipeline_env())
    assert shard_settings <= set(_configmap())
    for name in shard_settings:
        assert _pipeline_env()[name] == _configmap()[name], name


def _compose_secret_files(service: str) -> dict[str, Path]:
    """`/run/secrets/<name>` -> the file on this machine, for every secret `service` gets."""
    compose = load_compose()
    names = compose["services"][service].get("secrets", [])
    return {f"/run/secrets/{n}": ROOT / compose["secrets"][n]["file"] for n in names}


def test_pipeline_environment_is_a_valid_configuration(tmp_path: Path) -> None:
    from dataflow.config import Config
    from dataflow.run import recovery_args

    env = _pipeline_env()
    files = _compose_secret_files("pipeline")
    # The *_FILE settings, pointed at the files the secrets are made of.
    config = Config.from_env({k: str(files.get(v, v)) for k, v in env.items()})
    assert config.redis.password.source == "REDIS_PASSWORD_FILE"
    assert config.opensearch.enabled
    assert config.kafka.dlq_topic not in config.kafka.topics
    # The recovery settings, as dataflow.run reads them (pointed at a temporary directory).
    assert env["RECOVERY_DIR"] == RECOVERY_PATH
    flags = recovery_args({**env, "RECOVERY_DIR": str(tmp_path)}, [])
    assert flags == ["-r", str(tmp_path), "-s", env["SNAPSHOT_INTERVAL_SECONDS"], "-b", "0"]
    assert len(list(tmp_path.glob("part-*.sqlite3"))) == int(env["RECOVERY_PARTITIONS"])


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"//{address}")
    assert parts.hostname and parts.port, address
    return parts.hostname, parts.port


def test_pipeline_endpoints_point_at_the_compose_services() -> None:
    services = load_compose()["services"]
    env = _pipeline_env()
    for broker in env["KAFKA_BROKERS"].split(","):
        host, port = _host_port(broker)
        assert host == "kafka"
        advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        assert f"//{host}:{port}" in advertised
    assert _host_port(env["REDIS_URL"]) == ("redis", 6379)
    assert _host_port(env["OPENSEARCH_URL"]) == ("opensearch", 9200)
    ports = services["pipeline"]["ports"]
    assert f"{env['BYTEWAX_DATAFLOW_API_PORT']}:{env['BYTEWAX_DATAFLOW_API_PORT']}" in ports
    assert env["METRICS_ENABLED"] == "true"


def test_compose_secrets_are_files_the_pipeline_and_redis_share() -> None:
    compose = load_compose()
    env = _pipeline_env()
    files = _compose_secret_files("pipeline")
    secret_rows = {row.name for row in settings.SETTINGS if row.secret}
    # No secret in the environment: a URL without a password at most, the rest as files.
    for name in secret_rows & set(env):
        assert urlsplit(env[name]).password is None, name
    file_settings = {name: path for name, path in env.items() if name.endswith("_FILE")}
    assert file_settings == {"REDIS_PASSWORD_FILE": "/run/secrets/redis-password"}
    for name, path in file_settings.items():
        assert name.removesuffix("_FILE") in secret_rows, name
        assert path in files, f"{name}: {path} is not a secret of the pipeline service"
        assert files[path].is_file() and files[path].read_text().strip(), files[path]
    # Redis takes its user's password from the same secret.
    assert compose["services"]["redis"]["secrets"] == ["redis-password"]
    script = "\n".join(compose["services"]["redis"]["command"])
    assert "/run/secrets/redis-password" in script and "user default off" in script
    assert f"user {urlsplit(env['REDIS_URL']).username} on #" in script


def test_pipeline_healthcheck_is_the_dockerfile_one() -> None:
    compose = load_compose()["services"]["pipeline"]["healthcheck"]["test"]
    dockerfile = _healthcheck_command(_last(dockerfile_stages()[-1], "HEALTHCHECK"))
    assert compose == ["CMD", *dockerfile]


def test_kafka_init_creates_the_topics_the_pipeline_reads() -> None:
    services = load_compose()["services"]
    init = services["kafka-init"]
    assert init["restart"] == "no"
    script = "\n".join(init["command"])
    created: dict[str, int] = {}
    for line in script.splitlines():
        words = shlex.split(line)
        if "--create" in words:
            created[words[words.index("--topic") + 1]] = int(words[words.index("--partitions") + 1])
            bootstrap = words[words.index("--bootstrap-server") + 1]
            assert bootstrap == _pipeline_env()["KAFKA_BROKERS"]
            assert "--if-not-exists" in words
    env = _pipeline_env()
    wanted = set(env["KAFKA_TOPICS"].split(",")) | {env["KAFKA_DLQ_TOPIC"]}
    assert wanted <= set(created)
    assert all(created[t] >= 1 for t in wanted)
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_recovery_lives_on_a_named_volume_at_the_image_path() -> None:
    compose = load_compose()
    volumes = compose["services"]["pipeline"]["volumes"]
    named = [v.split(":") for v in volumes if v.split(":")[1] == RECOVERY_PATH]
    assert len(named) == 1
    source = named[0][0]
    assert not source.startswith((".", "/")), "a named volume, not a bind mount"
    assert source in compose["volumes"]
    assert _pipeline_env()["RECOVERY_DIR"] == RECOVERY_PATH


def test_prometheus_loads_the_compose_config_and_the_rule_files() -> None:
    service = load_compose()["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in service["volumes"] if v.startswith("./"))
    host_dir, container_dir = next(iter(mounts.items()))
    assert (ROOT / host_dir).resolve() == ROOT / "ops" / "prometheus"
    config_flag = [a for a in service["command"] if a.startswith("--config.file=")]
    assert config_flag == [f"--config.file={container_dir}/prometheus.compose.yml"]
    config = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.compose.yml").read_text())
    assert config["rule_files"] == [f"{container_dir}/*.rules.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["search-features"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"pipeline:{_pipeline_env()['BYTEWAX_DATAFLOW_API_PORT']}"]
    # The local stack generates its config with the same job name: rules see one `job`.
    assert "job_name: search-features" in (ROOT / "stack" / "stack.sh").read_text()
    for rules in (ROOT / "ops" / "prometheus").glob("*.rules.yml"):
        assert "groups" in yaml.safe_load(rules.read_text()), rules


def test_generator_service_arguments_parse() -> None:
    from dataflow.tools.generator import _parser

    service = load_compose()["services"]["generator"]
    assert service["profiles"] == ["demo"]
    assert service["entrypoint"] == ["python", "-m", "dataflow.tools.generator"]
    args = _parser().parse_args(service["command"])
    assert args.kafka == _pipeline_env()["KAFKA_BROKERS"]
    assert args.topic in _pipeline_env()["KAFKA_TOPICS"].split(",")


def test_compose_has_no_accidental_interpolation() -> None:
    # Compose substitutes $VAR and ${VAR}; a shell `$x` meant for a container must be `$$x`.
    text = (ROOT / "docker-compose.yml").read_text()
    assert re.findall(r"(?<!\$)\$(?![${])", text) == []


# --- k8s/ -------------------------------------------------------------------------------


@functools.cache
def _parsed_k8s() -> dict[str, Any]:
    docs: dict[str, Any] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']}s"
            docs[doc["kind"]] = doc
    return docs


def load_k8s() -> dict[str, Any]:
    """Every manifest in k8s/ (secret.example.yaml included) by kind; a fresh copy."""
    return copy.deepcopy(_parsed_k8s())


def _pod() -> dict[str, Any]:
    return load_k8s()["StatefulSet"]["spec"]["template"]


def _container(name: str) -> dict[str, Any]:
    spec = _pod()["spec"]
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def _literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _configmap() -> dict[str, str]:
    return load_k8s()["ConfigMap"]["data"]


def _secret() -> dict[str, str]:
    return load_k8s()["Secret"]["stringData"]


def test_manifests_match_the_kubernetes_schemas() -> None:
    schema = json.loads((DATA / "k8s-1.30-strict-subset.schema.json").read_text())

    def errors(doc: dict[str, Any]) -> list[str]:
        validator = jsonschema.Draft202012Validator(
            {**schema, "$ref": f"#/$defs/kind.{doc['kind']}"}
        )
        return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]

    docs = load_k8s()
    assert set(docs) == {"ConfigMap", "Secret", "Service", "StatefulSet", "PodDisruptionBudget"}
    for doc in docs.values():
        assert errors(doc) == [], doc["kind"]
    broken = load_k8s()["StatefulSet"]
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert len(errors(broken)) == 1


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.example.yaml"}
    images = {i["name"] for i in kustomization["images"]}
    for name in ("prepare", "pipeline"):
        assert _container(name)["image"].split(":")[0] in images


def test_statefulset_headless_service_and_pdb_agree() -> None:
    docs = load_k8s()
    sts, svc, pdb = docs["StatefulSet"], docs["Service"], docs["PodDisruptionBudget"]
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for selector in (
        sts["spec"]["selector"]["matchLabels"],
        svc["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
    ):
        assert selector and selector.items() <= labels.items()
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"]["type"] == "OnDelete"
    assert pdb["spec"]["maxUnavailable"] == 1
    container_ports = {p["name"]: p["containerPort"] for p in _container("pipeline")["ports"]}
    for port in svc["spec"]["ports"]:
        assert container_ports[port["targetPort"]] == port["port"]


def test_metrics_port_probes_and_scrape_annotations_agree() -> None:
    pipeline = _container("pipeline")
    ports = {p["name"]: p["containerPort"] for p in pipeline["ports"]}
    assert ports["metrics"] == int(_configmap()["BYTEWAX_DATAFLOW_API_PORT"]) == METRICS_PORT
    assert _configmap()["METRICS_ENABLED"] == "true"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert pipeline[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    annotations = _pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    assert annotations["prometheus.io/path"] == "/metrics"
    assert ports["bytewax"] == int(_literal_env(_container("prepare"))["PROCESS_PORT"])


def test_pipeline_container_env_names_are_known_to_the_code() -> None:
    pipeline = _container("pipeline")
    names = set(_configmap()) | {e["name"] for e in pipeline["env"]}
    assert names - known_env_names() == set()
    refs = {
        next(iter(source.values()))["name"]: kind
        for source in pipeline["envFrom"]
        for kind in source
    }
    # The Secret is mounted as files, never loaded into the environment.
    assert refs == {load_k8s()["ConfigMap"]["metadata"]["name"]: "configMapRef"}
    assert _pod()["spec"]["enableServiceLinks"] is False  # no SERVICE_PORT_... variables


SECRETS_MOUNT = "/etc/search-features/secrets"


def _secret_volume() -> dict[str, Any]:
    volumes = {v["name"]: v for v in _pod()["spec"]["volumes"]}
    mounts = {m["name"]: m for m in _container("pipeline")["volumeMounts"]}
    assert mounts["secrets"]["mountPath"] == SECRETS_MOUNT
    assert mounts["secrets"]["readOnly"] is True
    secret: dict[str, Any] = volumes["secrets"]["secret"]
    return secret


def test_the_secret_is_mounted_as_files_readable_by_the_pod_group_only() -> None:
    volume = _secret_volume()
    assert volume["secretName"] == load_k8s()["Secret"]["metadata"]["name"]
    assert not volume.get("optional", False)  # no credentials, no start
    assert volume["defaultMode"] == 0o440
    assert "secrets" not in {m["name"] for m in _container("prepare")["volumeMounts"]}


def _file_settings() -> dict[str, str]:
    """The ConfigMap's settings that name a file of the Secret: `*_FILE` and the CA bundle."""
    return {k: v for k, v in _configmap().items() if v.startswith(SECRETS_MOUNT + "/")}


def test_every_secret_setting_is_a_file_of_the_secret_and_every_file_is_used() -> None:
    files = _file_settings()
    secret_rows = {row.name for row in settings.SETTINGS if row.secret}
    assert {name for name in files if name.removesuffix("_FILE") in secret_rows} == {
        "REDIS_PASSWORD_FILE",
        "KAFKA_SASL_PASSWORD_FILE",
        "OPENSEARCH_PASSWORD_FILE",
    }
    for name in files:
        ca_bundles = ("REDIS_CA_FILE", "KAFKA_SSL_CA_LOCATION", "OPENSEARCH_CA_FILE")
        assert name.removesuffix("_FILE") in secret_rows or name in ca_bundles, name
    used = {path.removeprefix(SECRETS_MOUNT + "/") for path in files.values()}
    assert used == set(_secret()), "every key of the Secret is a file some setting reads"


def test_configmap_and_secret_make_a_valid_configuration(tmp_path: Path) -> None:
    from dataflow.config import Config

    # The Secret's files, as the kubelet writes them into the mount.
    for key, value in _secret().items():
        (tmp_path / key).write_text(value)
    env = {k: v.replace(SECRETS_MOUNT, str(tmp_path)) for k, v in _configmap().items()}
    config = Config.from_env(env)
    assert config.kafka.security_protocol == "SASL_SSL"
    assert config.kafka.sasl_password.get() == "CHANGE_ME"
    assert config.kafka.sasl_password.source == "KAFKA_SASL_PASSWORD_FILE"
    assert config.redis.password.get() == "CHANGE_ME"
    assert config.redis.url.get().startswith("rediss://search-features@")
    ca = str(tmp_path / "ca.pem")
    assert config.redis.ca_file == config.kafka.ssl_ca_location == config.opensearch.ca_file == ca
    assert config.opensearch.verify_certs
    assert config.opensearch.password.get() == "CHANGE_ME"
    assert config.opensearch.enabled


def test_secrets_stay_out_of_the_configmap_and_the_example_has_only_placeholders() -> None:
    secret_names = secret_env_names()
    assert set(_secret()) == {
        "redis-password",
        "kafka-sasl-password",
        "opensearch-password",
        "ca.pem",
    }
    for name, value in _secret().items():
        assert "CHANGE_ME" in value, name
    for name in secret_names & set(_configmap()):
        # Only a URL without credentials may sit in the ConfigMap.
        assert urlsplit(_configmap()[name]).password is None, name


def test_bytewax_run_reads_process_id_addresses_and_recovery_from_this_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bytewax.run

    replicas = load_k8s()["StatefulSet"]["spec"]["replicas"]
    hostfile = tmp_path / "hostfile.txt"
    hostfile.write_text("".join(f"host-{i}:2101\n" for i in range(replicas)))
    env = {**_configmap(), "BYTEWAX_HOSTFILE_PATH": str(hostfile)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sts_name = load_k8s()["StatefulSet"]["metadata"]["name"]
    assert env["BYTEWAX_STATEFULSET_NAME"] == sts_name
    monkeypatch.setenv("BYTEWAX_POD_NAME", f"{sts_name}-{replicas - 1}")
    monkeypatch.setattr(sys, "argv", ["bytewax.run", "dataflow.flow:flow"])
    args = bytewax.run._parse_args()
    assert args.process_id == replicas - 1
    assert args.addresses == ";".join(f"host-{i}:2101" for i in range(replicas))
    assert args.workers_per_process == 1
    assert str(args.recovery_directory) == RECOVERY_PATH
    assert args.snapshot_interval == timedelta(seconds=10)
    assert args.backup_interval == timedelta(0)


def test_recovery_volume_is_mounted_where_bytewax_looks_and_not_via_recovery_dir() -> None:
    sts = load_k8s()["StatefulSet"]
    claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    assert claims == ["recovery"]
    template = sts["spec"]["volumeClaimTemplates"][0]["spec"]
    assert template["accessModes"] == ["ReadWriteOnce"]
    for name in ("prepare", "pipeline"):
        mounts = {m["name"]: m["mountPath"] for m in _container(name)["volumeMounts"]}
        assert mounts["recovery"] == _configmap()["BYTEWAX_RECOVERY_DIRECTORY"] == RECOVERY_PATH
        hostfile_dir = os.path.dirname(_configmap()["BYTEWAX_HOSTFILE_PATH"])
        assert mounts["hostfile"] == hostfile_dir
    # dataflow.run would create *all* partitions in an empty RECOVERY_DIR; with one volume
    # per pod that duplicates partitions. Only the init container creates them.
    pipeline_env = (
        set(_configmap()) | set(_secret()) | {e["name"] for e in _container("pipeline")["env"]}
    )
    assert "RECOVERY_DIR" not in pipeline_env
    assert "-r" not in _container("pipeline").get("args", [])


def test_replicas_process_count_and_recovery_layout_agree() -> None:
    sts = load_k8s()["StatefulSet"]
    env = _literal_env(_container("prepare"))
    replicas = sts["spec"]["replicas"]
    assert int(env["PROCESS_COUNT"]) == replicas
    assert int(env["RECOVERY_LAYOUT_PROCESSES"]) == replicas  # as first deployed
    assert int(env["RECOVERY_PARTITIONS"]) >= replicas
    assert int(env["RECOVERY_PARTITIONS"]) % replicas == 0  # an even share per pod
    assert env["SERVICE_NAME"] == sts["spec"]["serviceName"]
    assert _container("prepare")["image"] == _container("pipeline")["image"]


def test_init_container_env_names_are_read_by_its_script() -> None:
    prepare = _container("prepare")
    script = prepare["command"][2]
    for entry in prepare["env"]:
        assert f'env["{entry["name"]}"]' in script or f"env['{entry['name']}']" in script, entry
    for name in ("BYTEWAX_STATEFULSET_NAME", "BYTEWAX_HOSTFILE_PATH", "BYTEWAX_RECOVERY_DIRECTORY"):
        assert f'env["{name}"]' in script and name in _configmap()


def _quantity(text: str) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_containers_are_locked_down_and_sized() -> None:
    pod = _pod()["spec"]
    for name in ("prepare", "pipeline"):
        container = _container(name)
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        resources = container["resources"]
        assert _quantity(resources["limits"]["memory"]) >= _quantity(
            resources["requests"]["memory"]
        )
        assert "cpu" in resources["requests"]
    pipeline = _container("pipeline")["resources"]
    assert _quantity(pipeline["requests"]["cpu"]) >= 1  # one GIL-bound worker
    assert _quantity(pipeline["requests"]["memory"]) >= 2**30
    assert "cpu" not in pipeline["limits"]
    mounts = {m["mountPath"] for m in _container("pipeline")["volumeMounts"]}
    assert "/tmp" in mounts  # the only writable path besides the volumes
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"


# --- the init container's script, run for real ----------------------------------------


def _prepare_env(ordinal: int, root: Path, **overrides: str) -> dict[str, str]:
    """The init container's environment for pod `ordinal`, with its paths under `root`."""
    sts = load_k8s()["StatefulSet"]
    env = {**_configmap(), **_literal_env(_container("prepare"))}
    env["BYTEWAX_POD_NAME"] = f"{sts['metadata']['name']}-{ordinal}"
    env["POD_NAMESPACE"] = "search"
    env["BYTEWAX_HOSTFILE_PATH"] = str(root / f"hostfile-{ordinal}.txt")
    env["BYTEWAX_RECOVERY_DIRECTORY"] = str(root / f"recovery-{ordinal}")
    env["DNS_WAIT_SECONDS"] = "0"  # the pod names do not resolve outside a cluster
    env.update(overrides)
    Path(env["BYTEWAX_RECOVERY_DIRECTORY"]).mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ["PATH"], **env}


def _run_prepare(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = _container("prepare")["command"][2]
    return subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _partitions_in(directory: Path) -> dict[int, int]:
    """{part_index: part_count} as recorded inside the SQLite files (what Bytewax reads)."""
    found = {}
    for path in directory.glob("*.sqlite3"):
        connection = sqlite3.connect(path)
        try:
            for index, count in connection.execute("SELECT part_index, part_count FROM parts"):
                assert index not in found
                found[index] = count
        finally:
            connection.close()
    return found


def _resume(directory: Path) -> None:
    """Run a tiny dataflow against the recovery partitions in `directory`."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.recovery import RecoveryConfig
    from bytewax.testing import TestingSink, TestingSource, run_main

    out: list[Any] = []
    flow = Dataflow("layout_check")
    op.output("out", op.input("in", flow, TestingSource([1, 2, 3])), TestingSink(out))
    run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(directory))
    assert out == [1, 2, 3]


def test_init_script_writes_the_hostfile_and_a_disjoint_share_of_partitions(tmp_path: Path) -> None:
    from bytewax.recovery import MissingPartitionsError

    sts = load_k8s()["StatefulSet"]
    replicas = sts["spec"]["replicas"]
    env0 = _prepare_env(0, tmp_path)
    total = int(env0["RECOVERY_PARTITIONS"])
    shares = {}
    for ordinal in range(replicas):
        env = _prepare_env(ordinal, tmp_path)
        result = _run_prepare(env)
        assert result.returncode == 0, result.stderr
        shares[ordinal] = _partitions_in(Path(env["BYTEWAX_RECOVERY_DIRECTORY"]))
        hosts = Path(env["BYTEWAX_HOSTFILE_PATH"]).read_text().splitlines()
        name, svc = sts["metadata"]["name"], sts["spec"]["serviceName"]
        assert hosts == [f"{name}-{i}.{svc}.search.svc:2101" for i in range(replicas)]
    indices = [i for share in shares.values() for i in share]
    assert sorted(indices) == list(range(total)), "every partition exactly once"
    assert {len(share) for share in shares.values()} == {total // replicas}
    assert all(count == total for share in shares.values() for count in share.values())

    # A restart changes nothing.
    before = sorted(p.name for p in tmp_path.rglob("*.sqlite3"))
    assert _run_prepare(_prepare_env(1, tmp_path)).returncode == 0
    assert sorted(p.name for p in tmp_path.rglob("*.sqlite3")) == before

    # Bytewax accepts the union as one complete set, and refuses it without pod 0's share.
    union = tmp_path / "union"
    union.mkdir()
    for path in tmp_path.glob("recovery-*/*.sqlite3"):
        shutil.copy(path, union / path.name)
    _resume(union)
    for index in shares[0]:
        (union / f"part-{index}.sqlite3").unlink()
    with pytest.raises(MissingPartitionsError):
        _resume(union)


def test_init_script_gives_scale_up_pods_no_partitions(tmp_path: Path) -> None:
    layout = int(_prepare_env(0, tmp_path)["RECOVERY_LAYOUT_PROCESSES"])
    env = _prepare_env(layout, tmp_path, PROCESS_COUNT=str(layout + 1))
    result = _run_prepare(env)
    assert result.returncode == 0, result.stderr
    directory = Path(env["BYTEWAX_RECOVERY_DIRECTORY"])
    assert _partitions_in(directory) == {}
    assert json.loads((directory / "layout.json").read_text()) == {
        "partitions": int(env["RECOVERY_PARTITIONS"])
    }
    assert len(Path(env["BYTEWAX_HOSTFILE_PATH"]).read_text().splitlines()) == layout + 1


def test_init_script_never_recreates_partitions_on_an_initialised_volume(tmp_path: Path) -> None:
    env = _prepare_env(0, tmp_path)
    assert _run_prepare(env).returncode == 0
    directory = Path(env["BYTEWAX_RECOVERY_DIRECTORY"])
    for path in directory.glob("*.sqlite3"):  # moved away by an operator (scale-down)
        path.unlink()
    assert _run_prepare(env).returncode == 0
    assert _partitions_in(directory) == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"RECOVERY_PARTITIONS": "24"}, "RECOVERY_PARTITIONS=24"),
        ({"PROCESS_COUNT": "1", "BYTEWAX_POD_NAME": "search-features-2"}, "PROCESS_COUNT=1"),
        ({"BYTEWAX_POD_NAME": "other-0"}, "not a pod of the StatefulSet"),
        ({"RECOVERY_LAYOUT_PROCESSES": "0"}, "RECOVERY_LAYOUT_PROCESSES"),
    ],
)
def test_init_script_refuses_inconsistent_settings(
    tmp_path: Path, overrides: dict[str, str], message: str
) -> None:
    assert _run_prepare(_prepare_env(0, tmp_path)).returncode == 0  # an initialised volume
    result = _run_prepare(_prepare_env(0, tmp_path, **overrides))
    assert result.returncode != 0
    assert message in result.stderr
