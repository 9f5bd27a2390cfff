"""The ways to deploy the proxy: the container image, the kustomize base, docker-compose, the alert
rules and the Grafana dashboard (everything under ``deploy/`` and the top-level ``Dockerfile``).

No Docker engine, cluster, Prometheus server or Grafana runs here, so each artefact is checked by
what can be run offline: hadolint, kubernetes-validate's bundled schemas, kustomize (``kubectl
kustomize``), the Compose specification's JSON schema (vendored by check-jsonschema), promtool, and
``royalti-proxy check-config``. What the image runs is proved by building the wheel, installing it
into a fresh virtual environment and running the image's entrypoint, command and health check
against the fake Royalti API.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.__main__ import main as royalti_proxy
from proxy.clock import FakeClock
from proxy.config import load
from proxy.fakes.royalti import FakeRoyalti, start_fake
from tests.binaries import require_binary
from tests.conftest import EMAIL, PASSWORD, WS, ProxyFactory, free_port, royalti_config, run_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "royalti-proxy.json"
COMPOSE = DEPLOY / "docker-compose.yml"
#: The credentials' Secret as a manifest with placeholder values, beside (not in) the base.
SECRET_EXAMPLE = KUSTOMIZE / "secret.example.yaml"
#: Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29 and
#: GA in 1.33: the manifests must be valid for both.
KUBERNETES_VERSIONS = ("1.29", "1.33")
#: ``${VAR:-default}`` in the proxy's configuration files.
VAR_WITH_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}")
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
METRIC_NAME = re.compile(r"\broyalti_proxy_[a-z0-9_]+")


def tool(name: str) -> str:
    """A command-line tool from this virtual environment's dev extra, else from ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return require_binary(name)


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


# -- the Dockerfile ------------------------------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.image}"
        return found[-1]


def dockerfile_stages(path: Path = ROOT / "Dockerfile") -> list[Stage]:
    """The Dockerfile's stages, each a list of ``(KEYWORD, arguments)`` with continuations joined
    and comments dropped. ``ARG`` defaults before the first ``FROM`` are substituted in images."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for text in logical:
        keyword, _, rest = text.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), ""), rest)
            parts = image.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image=parts[0], name=name))
        elif not stages:
            if keyword == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                global_args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list), f"not the exec (JSON array) form: {text}"
    assert all(isinstance(v, str) for v in value)
    return value


def env_pairs(text: str) -> dict[str, str]:
    """``ENV A=1 B=2`` as a dict (the ``key=value`` form only)."""
    pairs = {}
    for token in shlex.split(text):
        key, sep, value = token.partition("=")
        assert sep, f"ENV without '=': {text}"
        pairs[key] = value
    return pairs


def healthcheck_command(stage: Stage) -> list[str]:
    text = stage.last("HEALTHCHECK")
    _, sep, command = text.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {text}"
    return exec_form(command)


def copy_instructions(stage: Stage) -> list[tuple[list[str], str, str | None]]:
    """Each ``COPY [--from=X] SRC... DEST`` as ``(sources, dest, from)``."""
    out = []
    for text in stage.all("COPY"):
        args = text.split()
        origin = None
        while args[0].startswith("--"):
            flag = args.pop(0)
            if flag.startswith("--from="):
                origin = flag.removeprefix("--from=")
        out.append((args[:-1], args[-1], origin))
    return out


def image_config_path() -> str:
    """Where the image's command reads its configuration."""
    final = dockerfile_stages()[-1]
    command = exec_form(final.last("CMD"))
    return command[command.index("--config") + 1]


def test_dockerfile_passes_hadolint():
    result = run(tool("hadolint"), ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_on_slim_python_in_two_stages_and_ships_only_the_installed_wheel():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", stage.image), stage.image
    build, final = stages[0], stages[-1]
    assert build.name
    build_steps = " ".join(build.all("RUN"))
    assert "pip wheel --no-deps" in build_steps
    # The final stage gets the installed environment from the build stage and the default
    # configuration, never the source tree.
    for sources, dest, origin in copy_instructions(final):
        if origin is None:
            assert sources == ["deploy/docker/config.yaml"], sources
            assert dest == image_config_path()
        else:
            assert origin == build.name
    assert not final.all("ADD")


def test_image_runs_as_a_numeric_non_root_user_and_writes_nothing_at_run_time():
    final = dockerfile_stages()[-1]
    user = final.last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, user
    assert not gid or gid.isdigit(), user
    env: dict[str, str] = {}
    for text in final.all("ENV"):
        env.update(env_pairs(text))
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    # The bytecode is compiled at build time, so nothing is missing on a read-only filesystem.
    assert "compileall" in " ".join(dockerfile_stages()[0].all("RUN"))


def test_image_entrypoint_command_ports_labels_and_health_check_are_as_documented():
    final = dockerfile_stages()[-1]
    assert exec_form(final.last("ENTRYPOINT")) == ["royalti-proxy"]
    command = exec_form(final.last("CMD"))
    assert command[0] == "run"
    assert image_config_path().startswith("/etc/royalti-proxy/")
    assert set(final.last("EXPOSE").split()) == {"8080", "9090"}
    labels = " ".join(final.all("LABEL"))
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    check = healthcheck_command(final)
    assert check[:2] == ["python", "-c"]
    assert "127.0.0.1:9090/livez" in check[2]
    assert not {"curl", "wget"} & set(" ".join(check).split())


def test_dockerignore_admits_exactly_what_the_dockerfile_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "everything is excluded first, then what is needed let in"
    admitted = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        source.rstrip("/")
        for stage in dockerfile_stages()
        for sources, _, origin in copy_instructions(stage)
        if origin is None
        for source in sources
    }
    assert admitted == copied
    for path in copied:
        assert (ROOT / path).exists(), path


# -- what the image runs, installed from the wheel into a fresh virtual environment ---------------


@dataclass(frozen=True)
class Installed:
    """The wheel installed as the Dockerfile installs it, and the environment the image sets."""

    venv: Path
    env: dict[str, str]

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in root.rglob("*")
        if not p.is_symlink()
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel from exactly what the Dockerfile copies into its build stage, install it
    (with the "fast" extra, as an image built with ``--build-arg EXTRAS=fast`` does) into a new
    virtual environment without pip, and compile its bytecode, as the image does."""
    tmp = tmp_path_factory.mktemp("image")
    context = tmp / "context"
    build = dockerfile_stages()[0]
    for sources, dest, origin in copy_instructions(build):
        assert origin is None
        for source in sources:
            assert dest in ("./", f"./{source}"), "the test copies sources to the same place"
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                context.mkdir(exist_ok=True)
                shutil.copy2(src, context / source)
    install_steps = " ".join(build.all("RUN"))
    # No extra by default (uvloop is opt-in); EXTRAS=fast installs the wheel with [fast], as here.
    assert 'EXTRAS=""' in build.all("ARG")
    assert "royalti_auth_proxy-*.whl)${EXTRAS:+[$EXTRAS]}" in install_steps
    wheels = tmp / "wheels"
    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, context)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("royalti_auth_proxy-*.whl")
    venv = tmp / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", python, "install", "-q"]
    done = run(*pip, "--disable-pip-version-check", f"{wheel}[fast]")
    assert done.returncode == 0, done.stderr
    compiled = run(python, "-m", "compileall", "-q", venv / "lib")
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr

    final = dockerfile_stages()[-1]
    env: dict[str, str] = {}
    for text in final.all("ENV"):
        env.update(env_pairs(text))
    # The image's PATH puts its environment first; nothing else of this machine's is inherited.
    env["PATH"] = env["PATH"].replace("/opt/royalti-proxy/bin", str(venv / "bin"))
    env["PATH"] = env["PATH"].replace("$PATH", "/usr/local/bin:/usr/bin:/bin")
    # uvloop when installed: the image's command is run on the loop the fast extra brings.
    env["ROYALTI_PROXY_LOOP"] = "auto"
    return Installed(venv=venv, env=env)


def test_the_installed_package_comes_from_the_wheel_not_the_source_tree(
    installed: Installed, tmp_path: Path
):
    result = subprocess.run(
        [str(installed.bin / "python"), "-c", "import proxy, uvloop; print(proxy.__file__)"],
        env=installed.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(installed.venv)


def secret_files(config: Path, directory: Path) -> dict[str, str]:
    """For every ``${VAR:-/a/path}`` in ``config``: a file with a secret in ``directory``, and
    ``VAR`` pointing at it (the deployments' configs name their secret files this way)."""
    env = {}
    for name, default in VAR_WITH_DEFAULT.findall(config.read_text(encoding="utf-8")):
        if default.startswith("/"):
            path = directory / name.lower()
            path.write_text(PASSWORD if "PASSWORD" in name else f"secret-{name.lower()}\n")
            env[name] = str(path)
    return env


@contextlib.asynccontextmanager
async def fake_royalti() -> AsyncIterator[tuple[FakeRoyalti, str]]:
    fake = FakeRoyalti()
    runner, url = await start_fake(fake)
    try:
        yield fake, url
    finally:
        await runner.cleanup()


async def read_started(stream: asyncio.StreamReader) -> Any:
    """The proxy's ``started`` log line (JSON on stderr)."""
    while line := await stream.readline():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "started":
                return record
    raise AssertionError("the proxy exited before it started")


async def test_the_image_command_installed_from_the_wheel_serves_and_passes_its_health_check(
    installed: Installed, tmp_path: Path
):
    final = dockerfile_stages()[-1]
    entrypoint = exec_form(final.last("ENTRYPOINT"))
    command = exec_form(final.last("CMD"))
    # The image copies deploy/docker/config.yaml to the path in its command.
    config = ROOT / "deploy" / "docker" / "config.yaml"
    command = [str(config) if arg == image_config_path() else arg for arg in command]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    async with fake_royalti() as (fake, url):
        env = {
            **installed.env,
            **secret_files(config, secrets),
            "ROYALTI_EMAIL": EMAIL,
            "ROYALTI_WORKSPACE": WS[0],
            "ROYALTI_API_URL": url,
            "ROYALTI_PROXY_LISTEN": "127.0.0.1:0",
            "ROYALTI_PROXY_ADMIN_LISTEN": "127.0.0.1:0",
        }
        program = str(installed.bin / entrypoint[0])
        checked = await asyncio.create_subprocess_exec(
            program,
            "check-config",
            *command[1:],
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await checked.communicate()
        assert checked.returncode == 0, err.decode()
        assert b"configuration OK" in out

        before = snapshot(installed.venv)
        proc = await asyncio.create_subprocess_exec(
            program,
            *entrypoint[1:],
            *command,
            env=env,
            cwd=tmp_path,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stderr is not None
            started = await asyncio.wait_for(read_started(proc.stderr), 20)
            assert started["event_loop"] == "uvloop"  # ROYALTI_PROXY_LOOP=auto, [fast] installed
            admin_port = started["admin"].rsplit(":", 1)[1]
            # The health check exactly as the image runs it, but for the admin port, which the
            # test had the system choose.
            check = healthcheck_command(final)
            assert check[2].count(":9090/") == 1
            check[2] = check[2].replace(":9090/", f":{admin_port}/")
            check[0] = str(installed.bin / check[0])
            healthy = await asyncio.create_subprocess_exec(*check, env=env, cwd=tmp_path)
            assert await asyncio.wait_for(healthy.wait(), 20) == 0

            proxy_url = started["listen"]
            if "://" not in proxy_url:
                proxy_url = f"http://{proxy_url}"
            async with aiohttp.ClientSession() as http, http.get(f"{proxy_url}/user/") as resp:
                assert resp.status == 200
            assert fake.login_calls == 1
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert snapshot(installed.venv) == before, "the running proxy wrote into its installation"


# -- the proxy's configuration files in deploy/ ---------------------------------------------------


def proxy_configs() -> list[Path]:
    """Every YAML file under deploy/ that is a configuration of the proxy."""
    found = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        docs = load_yaml_all(path)
        if len(docs) == 1 and isinstance(docs[0], dict) and "upstreams" in docs[0]:
            found.append(path)
    return found


def test_deploy_has_a_proxy_configuration_for_the_image_compose_and_kubernetes():
    assert {p.relative_to(DEPLOY).as_posix() for p in proxy_configs()} == {
        "docker/config.yaml",
        "compose/royalti-proxy.yaml",
        "kubernetes/config.yaml",
    }


@pytest.mark.parametrize("config", proxy_configs(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_proxy_configuration_in_deploy_passes_check_config(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    text = config.read_text(encoding="utf-8")
    # Every file a deployment config names can be redirected with ${VAR:-/default/path}.
    for key, value in re.findall(r"^\s*(\w+_file):\s*(.*)$", text, re.MULTILINE):
        assert VAR_WITH_DEFAULT.fullmatch(value.strip()), f"{key}: {value}"
    env = {**secret_files(config, tmp_path), "ROYALTI_EMAIL": EMAIL}
    assert royalti_proxy(["check-config", "--config", str(config)], env=env) == 0
    assert "configuration OK" in capsys.readouterr().out


# -- the kustomize base ---------------------------------------------------------------------------


def kustomization() -> Any:
    return load_yaml(KUSTOMIZE / "kustomization.yaml")


def render() -> list[dict[str, Any]]:
    """The objects of the kustomize base, rendered the way kustomize does for what this base
    uses (resources, configMapGenerator with files, generatorOptions)."""
    k = kustomization()
    assert set(k) <= {
        "apiVersion",
        "kind",
        "resources",
        "configMapGenerator",
        "generatorOptions",
    }, "the test renderer supports only these fields; extend it with the kustomization"
    options = k.get("generatorOptions", {})
    assert options.get("disableNameSuffixHash") is True
    objects: list[dict[str, Any]] = []
    for generator in k.get("configMapGenerator", []):
        data = {
            Path(f).name: (KUSTOMIZE / f).read_text(encoding="utf-8") for f in generator["files"]
        }
        metadata = {"name": generator["name"], "labels": dict(options.get("labels", {}))}
        objects.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
        )
    for resource in k["resources"]:
        objects.extend(load_yaml_all(KUSTOMIZE / resource))
    return objects


def by_kind(kind: str) -> dict[str, Any]:
    (found,) = [o for o in render() if o["kind"] == kind]
    return found


def pod_spec() -> Any:
    return by_kind("Deployment")["spec"]["template"]["spec"]


def sidecar() -> Any:
    (proxy,) = [c for c in pod_spec()["initContainers"] if c["name"] == "royalti-proxy"]
    return proxy


def sidecar_config() -> Any:
    (config,) = by_kind("ConfigMap")["data"].values()
    return config


def test_kustomization_uses_every_manifest_in_its_directory_but_the_secret_example():
    k = kustomization()
    used = set(k["resources"]) | {
        f for generator in k.get("configMapGenerator", []) for f in generator["files"]
    }
    present = {p.name for p in KUSTOMIZE.iterdir()} - {"kustomization.yaml"}
    assert used == present - {SECRET_EXAMPLE.name}
    assert SECRET_EXAMPLE.is_file()


def test_kubectl_kustomize_renders_what_the_test_renders():
    result = run(require_binary("kubectl"), "kustomize", KUSTOMIZE)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted(rendered, key=key) == sorted(render(), key=key)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_kubernetes_objects_pass_strict_schema_validation(version: str):
    built_in = [o for o in render() if not o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {o["kind"] for o in built_in} == {"ConfigMap", "Deployment"}
    for obj in built_in:
        kubernetes_validate.validate(obj, version, strict=True)


def test_strict_schema_validation_catches_a_misspelt_field():
    deployment = by_kind("Deployment")
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_proxy_is_a_native_sidecar_probed_on_its_admin_port():
    proxy = sidecar()
    assert proxy["restartPolicy"] == "Always"
    assert "royalti-proxy" not in {c["name"] for c in pod_spec()["containers"]}
    (admin,) = [p for p in proxy["ports"] if p["name"] == "admin"]
    assert admin["containerPort"] == 9090
    probes = {name: proxy[name]["httpGet"] for name in ("startupProbe", "livenessProbe")}
    probes["readinessProbe"] = proxy["readinessProbe"]["httpGet"]
    assert {name: (p["path"], p["port"]) for name, p in probes.items()} == {
        # The app starts only once the proxy holds a token.
        "startupProbe": ("/readyz", "admin"),
        "livenessProbe": ("/livez", "admin"),
        "readinessProbe": ("/readyz", "admin"),
    }


def test_the_sidecar_runs_the_image_command_with_the_configmap_configuration(tmp_path: Path):
    proxy = sidecar()
    command = exec_form(dockerfile_stages()[-1].last("CMD"))
    assert proxy["args"] == command
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    config_dir = str(Path(image_config_path()).parent)
    (config_volume,) = [n for n, m in mounts.items() if m["mountPath"] == config_dir]
    assert "subPath" not in mounts[config_volume], "a subPath mount never sees updates"
    assert volumes[config_volume]["configMap"]["name"] == by_kind("ConfigMap")["metadata"]["name"]
    assert Path(image_config_path()).name in by_kind("ConfigMap")["data"]

    path = tmp_path / "config.yaml"
    path.write_text(sidecar_config())
    env = {**secret_files(path, tmp_path), "ROYALTI_EMAIL": EMAIL}
    config = load(str(path), env)
    assert str(config.listen) == "127.0.0.1:8080", "loopback: only the pod's containers reach it"
    assert str(config.admin.listen) == "0.0.0.0:9090"
    assert config.shutdown_timeout < pod_spec()["terminationGracePeriodSeconds"]


def test_the_sidecar_environment_sets_every_variable_its_configuration_requires():
    required = {name for name, default in VAR.findall(sidecar_config()) if not default}
    assert required
    assert required <= {e["name"] for e in sidecar()["env"]}


def test_royalti_credentials_come_from_a_secret_mounted_as_files():
    proxy = sidecar()
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    secret_mounts = {
        m["mountPath"]: volumes[m["name"]]["secret"]
        for m in proxy["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }
    assert list(secret_mounts) == ["/var/run/secrets/royalti"]
    secret = secret_mounts["/var/run/secrets/royalti"]
    assert {i["path"] for i in secret["items"]} == {"password"}
    defaults = dict(VAR_WITH_DEFAULT.findall(sidecar_config()))
    assert defaults["ROYALTI_PASSWORD_FILE"] == "/var/run/secrets/royalti/password"
    # The email is not a secret file; it comes from the same Secret through the environment.
    (email,) = [e for e in proxy["env"] if e["name"] == "ROYALTI_EMAIL"]
    assert email["valueFrom"]["secretKeyRef"]["name"] == secret["secretName"]
    # No credential in the base itself.
    assert "Secret" not in {o["kind"] for o in render()}


# -- the Secret, declaratively ----------------------------------------------------------------


def secret_example() -> dict[str, Any]:
    (secret,) = load_yaml_all(SECRET_EXAMPLE)
    assert isinstance(secret, dict)
    return secret


def secret_references() -> tuple[set[str], set[str]]:
    """The Secret names and keys the base's pod reads: the mounted volume's items and every
    ``secretKeyRef`` of the sidecar's environment."""
    names, keys = set(), set()
    for volume in pod_spec()["volumes"]:
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
            keys.update(item["key"] for item in volume["secret"]["items"])
    for env in sidecar()["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            names.add(ref["name"])
            keys.add(ref["key"])
    return names, keys


def create_secret_commands(path: Path) -> list[list[str]]:
    """Every ``kubectl … create secret generic …`` in ``path``, in code or in ``#`` comments,
    with its continuation lines joined, as the words after ``generic``."""
    text = "\n".join(re.sub(r"^\s*#", "", line) for line in path.read_text().splitlines())
    text = re.sub(r"\\\n", " ", text)
    return [shlex.split(m) for m in re.findall(r"create secret generic ([^\n]*)", text)]


def test_the_secret_example_is_the_secret_the_deployment_reads_with_placeholder_values():
    secret = secret_example()
    assert (secret["apiVersion"], secret["kind"], secret["type"]) == ("v1", "Secret", "Opaque")
    names, keys = secret_references()
    assert names == {secret["metadata"]["name"]}
    # Plain text to fill in (no base64 to get wrong), exactly the keys the pod reads.
    assert "data" not in secret
    assert set(secret["stringData"]) == keys == {"email", "password"}
    assert secret["stringData"]["email"] == "ops@example.com"
    assert "REPLACE" in secret["stringData"]["password"]
    # A rotated password must reach the running proxy: an immutable Secret cannot change.
    assert not secret.get("immutable", False)
    # The base itself never carries it.
    assert SECRET_EXAMPLE.name not in kustomization()["resources"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_secret_example_passes_strict_schema_validation(version: str):
    kubernetes_validate.validate(secret_example(), version, strict=True)


@pytest.mark.parametrize(
    "path",
    [DEPLOY / "README.md", KUSTOMIZE / "kustomization.yaml", SECRET_EXAMPLE],
    ids=lambda p: p.relative_to(DEPLOY).as_posix(),
)
def test_every_kubectl_create_secret_line_makes_the_same_secret_as_the_manifest(path: Path):
    commands = create_secret_commands(path)
    assert commands, f"no kubectl create secret in {path}"
    secret = secret_example()
    for name, *flags in commands:
        assert name == secret["metadata"]["name"]
        keys = {
            flag.split("=", 2)[1]
            for flag in flags
            if flag.startswith(("--from-literal=", "--from-file="))
        }
        assert keys == set(secret["stringData"]), flags
    assert SECRET_EXAMPLE.relative_to(DEPLOY).as_posix() in (DEPLOY / "README.md").read_text()


def readme_overlay() -> str:
    """The overlay deploy/README.md writes with ``cat > overlays/royalti/kustomization.yaml``."""
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    (body,) = re.findall(
        r"cat > overlays/royalti/kustomization\.yaml <<'EOF'\n(.*?)\nEOF\n", text, re.DOTALL
    )
    return body


def test_the_readme_overlay_with_the_secret_copy_in_its_resources_renders_it_for_the_pod(
    tmp_path: Path,
):
    # The layout deploy/README.md describes: overlays/ next to this repository's deploy/.
    shutil.copytree(KUSTOMIZE, tmp_path / "deploy" / "kubernetes")
    overlay = tmp_path / "overlays" / "royalti"
    overlay.mkdir(parents=True)
    shutil.copy(SECRET_EXAMPLE, overlay / "royalti-credentials.yaml")
    data = yaml.safe_load(readme_overlay())
    data["resources"].append("royalti-credentials.yaml")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(data))
    result = run(require_binary("kubectl"), "kustomize", overlay)
    assert result.returncode == 0, result.stderr
    rendered = {o["kind"]: o for o in yaml.safe_load_all(result.stdout) if o}
    secret, deployment = rendered["Secret"], rendered["Deployment"]
    assert secret["metadata"]["namespace"] == deployment["metadata"]["namespace"] == "royalti"
    names, _ = secret_references()
    assert names == {secret["metadata"]["name"]}
    assert secret["stringData"] == secret_example()["stringData"]
    kubernetes_validate.validate(secret, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_container_is_locked_down_and_has_resource_requests_and_limits():
    pod = pod_spec()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for container in pod["initContainers"] + pod["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True, container["name"]
        assert sc["runAsUser"] > 0
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, container["name"]
    uid, _, _ = dockerfile_stages()[-1].last("USER").partition(":")
    assert sidecar()["securityContext"]["runAsUser"] == int(uid)


def test_the_podmonitor_scrapes_the_admin_port_of_every_pod_with_the_sidecar():
    monitor = by_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    pod_labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "admin"
    assert endpoint["path"] == "/metrics"


def test_the_prometheusrule_carries_exactly_the_rules_of_the_rules_file():
    rule = by_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == load_yaml(ALERTS)


# -- alert rules ----------------------------------------------------------------------------------


def alert_rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in load_yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r}


def test_alert_rules_pass_promtool_check_rules(tmp_path: Path):
    result = run(require_binary("promtool"), "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    # The PrometheusRule's spec, extracted to a plain rules file, is checked the same way.
    extracted = tmp_path / "prometheusrule.yml"
    extracted.write_text(yaml.safe_dump(by_kind("PrometheusRule")["spec"]))
    result = run(require_binary("promtool"), "check", "rules", extracted)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_promtool_unit_test_that_fires_it_and_the_tests_pass():
    tests = load_yaml(ALERT_TESTS)
    assert [Path(f).name for f in tests["rule_files"]] == [ALERTS.name]
    fired = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == set(alert_rules())
    result = run(require_binary("promtool"), "test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("alert", "expression"),
    [
        ("RoyaltiProxyTokenRenewalFailing", "royalti_proxy_token_consecutive_failures > 0"),
        (
            "RoyaltiProxyCredentialExpiringSoon",
            "royalti_proxy_credential_expiry_timestamp_seconds - time() < 7200",
        ),
        ("RoyaltiProxyNoValidToken", "royalti_proxy_token_valid == 0"),
        ("RoyaltiProxyUpstream5xx", 'royalti_proxy_requests_total{code=~"5.."}'),
        ("RoyaltiProxyErrors", "royalti_proxy_errors_total"),
        ("RoyaltiProxyNotReady", "royalti_proxy_ready == 0"),
    ],
)
def test_the_alerts_watch_what_operators_need(alert: str, expression: str):
    rule = alert_rules()[alert]
    assert expression in rule["expr"]
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert {"summary", "description"} <= set(rule["annotations"])
    assert re.fullmatch(r"\d+m", rule["for"])


# -- docker-compose ------------------------------------------------------------------------------


def compose() -> Any:
    return load_yaml(COMPOSE)


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    # The Compose specification's schema as vendored in check-jsonschema: no network needed.
    return run(
        sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", path
    )


def test_compose_file_validates_against_the_compose_specification():
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_validation_catches_a_misspelt_key(tmp_path: Path):
    data = compose()
    data["services"]["royalti-proxy"]["read_onyl"] = True
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(data))
    result = check_compose_schema(bad)
    assert result.returncode == 1
    assert "read_onyl" in result.stdout


def compose_proxy_config(tmp_path: Path) -> Any:
    data = compose()
    proxy = data["services"]["royalti-proxy"]
    (mount,) = [c for c in proxy["configs"] if c["target"] == image_config_path()]
    path = DEPLOY / data["configs"][mount["source"]]["file"]
    return load(str(path), {**secret_files(path, tmp_path), "ROYALTI_EMAIL": EMAIL})


def test_compose_proxy_is_reachable_only_by_the_client_that_holds_the_shared_secret(
    tmp_path: Path,
):
    data = compose()
    services, networks = data["services"], data["networks"]
    proxy, client = services["royalti-proxy"], services["client"]
    assert client["networks"] == ["app"]
    assert "app" in proxy["networks"]
    app = networks["app"]
    assert app["internal"] is True
    (subnet,) = [ipaddress.ip_network(c["subnet"]) for c in app["ipam"]["config"]]
    # Nothing but the client is on the app network, and nothing of the proxy is published.
    assert [n for n, s in services.items() if "app" in s.get("networks", [])] == [
        "royalti-proxy",
        "client",
    ]
    assert "ports" not in proxy

    config = compose_proxy_config(tmp_path)
    assert str(config.listen) == "0.0.0.0:8080"
    assert config.inbound.allowed_cidrs == (subnet,)
    assert config.inbound.shared_secret is not None
    secret_path = config.inbound.shared_secret.path
    assert secret_path is not None
    # The file check-config read came from the tmp dir; the default is the compose secret.
    defaults = dict(VAR_WITH_DEFAULT.findall(Path(config.source).read_text()))
    shared = defaults["ROYALTI_PROXY_SHARED_SECRET_FILE"]
    assert shared.startswith("/run/secrets/")
    name = shared.removeprefix("/run/secrets/")
    assert name in proxy["secrets"] and name in client["secrets"]
    assert client["environment"]["PROXY_SHARED_SECRET_FILE"] == shared
    assert client["environment"]["ROYALTI_PROXY_URL"] == "http://royalti-proxy:8080"
    # Only the proxy holds the Royalti password.
    password = defaults["ROYALTI_PASSWORD_FILE"].removeprefix("/run/secrets/")
    assert [n for n, s in services.items() if password in s.get("secrets", [])] == ["royalti-proxy"]


def duration_seconds(text: str) -> float:
    """A Compose duration such as ``1m30s`` or ``500ms``, in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def compose_healthcheck() -> dict[str, Any]:
    check: dict[str, Any] = compose()["services"]["royalti-proxy"]["healthcheck"]
    return check


def test_compose_client_waits_until_the_proxy_is_ready_not_merely_alive(tmp_path: Path):
    client = compose()["services"]["client"]
    assert client["depends_on"] == {"royalti-proxy": {"condition": "service_healthy"}}
    # "Healthy" is the proxy's own compose healthcheck, which asks /readyz, not the image's.
    check = compose_healthcheck()
    assert not check.get("disable")
    assert check["test"][:3] == ["CMD", "python", "-c"]
    (script,) = check["test"][3:]
    admin_port = compose_proxy_config(tmp_path).admin.listen.port
    assert re.findall(r"http://[^\"']+", script) == [f"http://127.0.0.1:{admin_port}/readyz"]
    assert "/livez" in healthcheck_command(dockerfile_stages()[-1])[2]
    # The script's own timeout is below Docker's, so a slow answer is reported, not killed.
    (timeout,) = (float(t) for t in re.findall(r"timeout=(\d+(?:\.\d+)?)", script))
    assert timeout < duration_seconds(check["timeout"])
    # A slow login has the start period before failures count; until the first success it is
    # checked every second, so the client starts about a second after the proxy is ready.
    assert duration_seconds(check["start_period"]) >= 30
    assert duration_seconds(check["start_interval"]) <= 1
    assert duration_seconds(check["interval"]) >= duration_seconds(check["timeout"])
    assert int(check["retries"]) >= 1


async def run_compose_healthcheck(admin: str) -> tuple[int, str]:
    """The compose healthcheck's command as Docker runs it, against the admin listener
    ``admin`` instead of the container's 127.0.0.1:9090; its exit status and stderr."""
    command = compose_healthcheck()["test"][1:]
    assert command[-1].count("http://127.0.0.1:9090/") == 1
    command[-1] = command[-1].replace("http://127.0.0.1:9090/", f"{admin}/")
    # The image's PATH finds its own Python; here, the one running the tests.
    command[0] = sys.executable
    proc = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_the_compose_healthcheck_fails_until_the_proxy_holds_a_token_then_passes(
    start_proxy: ProxyFactory, fake: FakeRoyalti, fake_url: str, clock: FakeClock
):
    fake.authtoken_failures = [(500, None)] * 1000
    proxy = await start_proxy(royalti_config(fake_url, default_workspace=WS[0]))
    await proxy.managers["royalti"].wait_idle()
    admin = proxy.addresses["admin"]
    async with aiohttp.ClientSession() as http, http.get(f"{admin}/livez") as resp:
        assert resp.status == 200, "alive: the image's own health check would pass"
    status, err = await run_compose_healthcheck(admin)
    assert status == 1
    # What `docker inspect` shows: the status and the reasons /readyz gives.
    assert "/readyz 503" in err
    assert "upstream royalti" in err and "HTTP_500" in err
    assert "Traceback" not in err

    fake.authtoken_failures.clear()
    await run_for(clock, proxy, 400, 5)
    assert await run_compose_healthcheck(admin) == (0, "")


async def test_the_compose_healthcheck_fails_when_nothing_answers():
    status, err = await run_compose_healthcheck(f"http://127.0.0.1:{free_port()}")
    assert status == 1
    assert err.startswith("/readyz: ") and "refused" in err
    assert "Traceback" not in err


def test_compose_services_are_hardened_and_credentials_are_compose_secrets():
    data = compose()
    for name in ("royalti-proxy", "client"):
        service = data["services"][name]
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        uid, _, _ = service["user"].partition(":")
        assert int(uid) > 0
    for name, secret in data["secrets"].items():
        path = DEPLOY / secret["file"]
        assert path.parent == DEPLOY / "compose" / "secrets", name
        # Created by whoever runs it, never committed.
        assert (path.parent / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]
    for name, config in data["configs"].items():
        assert (DEPLOY / config["file"]).is_file(), name
    environment = data["services"]["royalti-proxy"]["environment"]
    assert "PASSWORD" not in " ".join(environment)


def test_prometheus_and_grafana_run_only_with_the_monitoring_profile():
    services = compose()["services"]
    profiles = {name: s.get("profiles") for name, s in services.items()}
    assert profiles == {
        "royalti-proxy": None,
        "client": None,
        "prometheus": ["monitoring"],
        "grafana": ["monitoring"],
    }


def test_compose_prometheus_configuration_passes_promtool_and_scrapes_the_admin_port(
    tmp_path: Path,
):
    data = compose()
    prometheus = data["services"]["prometheus"]
    mounted = {
        c["target"]: DEPLOY / data["configs"][c["source"]]["file"] for c in prometheus["configs"]
    }
    config_file = next(p for target, p in mounted.items() if target.endswith("prometheus.yml"))
    config = load_yaml(config_file)
    # Check it with the rule files where the container sees them, rewritten to local copies.
    local_rules = []
    for rule_file in config["rule_files"]:
        local = tmp_path / Path(rule_file).name
        shutil.copy(mounted[rule_file], local)
        local_rules.append(str(local))
    config["rule_files"] = local_rules
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run(require_binary("promtool"), "check", "config", tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert mounted[load_yaml(config_file)["rule_files"][0]] == ALERTS

    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    admin_port = compose_proxy_config(tmp_path).admin.listen.port
    assert target == f"royalti-proxy:{admin_port}"


async def test_the_example_client_gets_through_the_guard_only_with_the_shared_secret(
    start_proxy: ProxyFactory, fake_url: str, tmp_path: Path
):
    secret = tmp_path / "proxy-shared-secret"
    secret.write_text("s3cret-shared\n")
    data = royalti_config(fake_url, default_workspace=WS[0])
    data["inbound"] = {"allowed_cidrs": ["127.0.0.1/32"], "shared_secret_file": str(secret)}
    proxy = await start_proxy(data)
    spec = importlib.util.spec_from_file_location(
        "example_client", DEPLOY / "compose" / "client.py"
    )
    assert spec is not None and spec.loader is not None
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    setattr(client, "PROXY_URL", proxy.addresses["proxy"])  # noqa: B010
    assert (await asyncio.to_thread(client.get, "/user/", "s3cret-shared")).startswith("200 ")
    refused = await asyncio.to_thread(client.get, "/user/", None)
    assert refused == "401 CLIENT_UNAUTHENTICATED"


# -- the Grafana dashboard, and the metric names against what /metrics exports --------------------


def dashboard() -> Any:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def dashboard_variable_queries() -> list[str]:
    return [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def test_dashboard_is_well_formed_and_uses_the_data_source_variable():
    d = dashboard()
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_dashboard_query_is_valid_promql(tmp_path: Path):
    # promtool parses each query as a recording rule, with Grafana's variables filled in.
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$instance", ".*"),
        }
        for i, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(require_binary("promtool"), "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("what", "metric"),
    [
        ("token expiry per workspace", "royalti_proxy_token_expiry_timestamp_seconds"),
        ("renewal outcomes", "royalti_proxy_token_fetches_total"),
        ("request rate by status", "royalti_proxy_requests_total"),
        ("upstream latency", "royalti_proxy_upstream_duration_seconds_bucket"),
        ("replays", "royalti_proxy_replays_total"),
        ("waits for tokens", "royalti_proxy_token_waits_total"),
        ("requests in flight", "royalti_proxy_requests_in_flight"),
    ],
)
def test_the_dashboard_shows(what: str, metric: str):
    assert any(metric in expr for expr in dashboard_exprs()), what


def test_grafana_provisioning_serves_the_dashboard_from_the_compose_prometheus():
    data = compose()
    grafana = data["services"]["grafana"]
    mounted = {
        c["target"]: DEPLOY / data["configs"][c["source"]]["file"] for c in grafana["configs"]
    }
    (dashboard_target,) = [t for t, p in mounted.items() if p == DASHBOARD]
    (provider_file,) = [p for t, p in mounted.items() if "/provisioning/dashboards/" in t]
    (datasource_file,) = [p for t, p in mounted.items() if "/provisioning/datasources/" in t]
    (provider,) = load_yaml(provider_file)["providers"]
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])
    (source,) = load_yaml(datasource_file)["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]


async def test_every_metric_in_the_dashboard_and_alerts_is_exported_by_the_proxy(
    start_proxy: ProxyFactory, fake_url: str
):
    data = royalti_config(fake_url, default_workspace=WS[0], allowed_workspaces=[WS[0], WS[1]])
    proxy = await start_proxy(data)
    base, admin = proxy.addresses["proxy"], proxy.addresses["admin"]
    async with aiohttp.ClientSession() as http:
        for workspace in (WS[0], WS[1], "not-allowed"):
            headers = {"X-Royalti-Workspace": workspace}
            async with http.get(f"{base}/user/", headers=headers) as resp:
                await resp.read()
        async with http.get(f"{admin}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    exported: set[str] = set()
    for family in text_string_to_metric_families(text):
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
    # Series exist for what the traffic above caused, so every family has samples.
    assert "royalti_proxy_errors_total" in exported
    assert "royalti_proxy_credential_expiry_timestamp_seconds" in exported

    used = {
        "dashboard": {
            m
            for e in dashboard_exprs() + dashboard_variable_queries()
            for m in METRIC_NAME.findall(e)
        },
        "alerts": {m for r in alert_rules().values() for m in METRIC_NAME.findall(r["expr"])},
    }
    for where, names in used.items():
        assert names, where
        assert names <= exported, f"{where} uses metrics /metrics does not have: {names - exported}"


# -- make image -----------------------------------------------------------------------------------


def make_image(
    tmp_path: Path, tools: dict[str, int], *args: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, list[str]]]:
    """``make image ARGS`` with a ``PATH`` on which the only container tools are stubs, one per
    entry of ``tools`` (name to exit status), each recording its directory and arguments; the
    result, and what each stub that ran recorded."""
    stubs, records = tmp_path / "stubs", tmp_path / "records"
    stubs.mkdir()
    records.mkdir()
    for name, status in tools.items():
        stub = stubs / name
        stub.write_text(
            f'#!/bin/sh\nprintf "%s\\n" "$PWD" "$@" > "{records / name}"\nexit {status}\n'
        )
        stub.chmod(0o755)
    # What the Makefile runs besides the container tool, and nothing else of this machine's
    # PATH (where a real docker may be).
    others = tmp_path / "bin"
    others.mkdir()
    for name in ("sed", "git"):
        found = shutil.which(name)
        if found is not None:
            (others / name).symlink_to(found)
    make = require_binary("make")
    result = subprocess.run(
        [make, "--no-print-directory", "-C", str(ROOT), "image", *args],
        # A clean environment: no MAKEFLAGS of an outer make, no IMAGE or CONTAINER_TOOL.
        env={"PATH": f"{stubs}:{others}", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    recorded = {p.name: p.read_text().splitlines() for p in records.iterdir()}
    return result, recorded


def expected_build(tag: str) -> list[str]:
    """The directory and arguments ``make image`` gives the container tool."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    git = shutil.which("git")
    head = run(git, "-C", ROOT, "rev-parse", "HEAD") if git else None
    revision = head.stdout.strip() if head is not None and head.returncode == 0 else "unknown"
    return [
        str(ROOT),
        "build",
        "--tag",
        tag,
        "--build-arg",
        f"VERSION={version}",
        "--build-arg",
        f"REVISION={revision}",
        "--file",
        "Dockerfile",
        ".",
    ]


def default_image() -> str:
    """The image docker-compose and the kustomize base run by default."""
    (compose_default,) = {
        re.sub(r"^\$\{ROYALTI_PROXY_IMAGE:-(.*)\}$", r"\1", s["image"])
        for s in compose()["services"].values()
        if "ROYALTI_PROXY_IMAGE" in s["image"]
    }
    assert sidecar()["image"] == compose_default
    return compose_default


@pytest.mark.parametrize(
    ("present", "used"),
    [(("docker",), "docker"), (("podman",), "podman"), (("docker", "podman"), "docker")],
)
def test_make_image_builds_with_docker_else_podman(
    tmp_path: Path, present: tuple[str, ...], used: str
):
    result, recorded = make_image(tmp_path, dict.fromkeys(present, 0))
    assert result.returncode == 0, result.stdout + result.stderr
    # The tag is the image docker-compose and Kubernetes run; the labels get the version and
    # the commit.
    assert recorded == {used: expected_build(default_image())}
    assert f"make image: built {default_image()} with {used}" in result.stdout


def test_make_image_takes_the_tool_and_the_tag_from_the_command_line(tmp_path: Path):
    tag = "registry.example.com/royalti-auth-proxy:0.1.0"
    result, recorded = make_image(
        tmp_path, {"docker": 0, "podman": 0}, "CONTAINER_TOOL=podman", f"IMAGE={tag}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert recorded == {"podman": expected_build(tag)}


def test_make_image_without_docker_or_podman_says_so_and_fails(tmp_path: Path):
    result, recorded = make_image(tmp_path, {})
    assert result.returncode == 2
    assert recorded == {}
    assert "make image: neither docker nor podman is on PATH, so no image was built." in (
        result.stderr
    )
    assert "CONTAINER_TOOL" in result.stderr
    assert "built" not in result.stdout


def test_make_image_fails_when_the_build_fails(tmp_path: Path):
    result, recorded = make_image(tmp_path, {"docker": 1})
    assert result.returncode == 2
    assert list(recorded) == ["docker"]
    assert "make image: built" not in result.stdout


def test_the_build_command_deploy_readme_shows_is_what_make_image_runs(tmp_path: Path):
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    (shown,) = re.findall(r"It runs exactly:\n\n```sh\n(.*?)\n```", text, re.DOTALL)
    _, recorded = make_image(tmp_path, {"docker": 0})
    directory, *build = recorded["docker"]
    assert directory == str(ROOT)
    # The README has the shell find the commit; make put it in.
    documented = [
        "REVISION=$(git rev-parse HEAD)" if word.startswith("REVISION=") else word for word in build
    ]
    assert shlex.split(shown.replace("\\\n", " ")) == ["docker", *documented]
