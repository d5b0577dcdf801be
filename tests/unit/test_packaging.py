"""The images install pinned versions (constraints.txt); the extras keep TensorFlow out of the client."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO_ROOT

IMAGE_EXTRAS = ("client", "images", "onnx", "serve", "model", "trainer-cpu", "worker-cpu", "review", "monitor")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        assert version and re.fullmatch(r"[0-9A-Za-z.+!-]+", version), f"not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = version
    return pins


def _requirements(project: dict[str, object], extra: str | None) -> list[Requirement]:
    table = project["dependencies"] if extra is None else project["optional-dependencies"][extra]  # type: ignore[index]
    return [Requirement(text) for text in table]  # type: ignore[union-attr]


def test_every_dependency_the_images_install_is_pinned() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for extra in (None, *IMAGE_EXTRAS):
        for requirement in _requirements(project, extra):
            name = canonicalize_name(requirement.name)
            if name == "allscore":
                continue  # another extra of this package
            assert name in pins, f"{requirement.name} ({extra or 'base'}) is not in constraints.txt: make constraints"
            assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])


def _all_names(project: dict[str, object], extras: list[str]) -> set[str]:
    """Every distribution the base and `extras` bring, the package's own extras followed."""
    found = {canonicalize_name(r.name) for r in _requirements(project, None)}
    for extra in extras:
        for r in _requirements(project, extra):
            found |= _all_names(project, sorted(r.extras)) if r.name == "allscore" else {canonicalize_name(r.name)}
    return found


def test_the_client_extra_brings_no_model_libraries() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = {canonicalize_name(r.name) for extra in (None, "client") for r in _requirements(project, extra)}
    assert not names & {"tensorflow", "tensorflow-cpu", "keras", "scipy", "scikit-image", "opencv-python-headless"}
    trainer = _all_names(project, ["trainer"])
    assert {"tensorflow", "keras"} <= trainer
    assert any(r.name == "allscore" and {"serve", "trainer"} <= r.extras for r in _requirements(project, "worker"))


def test_the_images_install_tensorflow_cpu_and_never_both_builds() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    extras = {ln.split("[")[-1].split("]")[0] for ln in dockerfile.splitlines() if "pip install" in ln}
    assert extras == {"trainer-cpu", "worker-cpu", "serve", "review", "serve,monitor"}
    for extra in extras:
        names = _all_names(project, extra.split(","))
        assert "tensorflow" not in names, extra  # the full build (CUDA libraries) in no image
        if "cpu" in extra:
            assert "tensorflow-cpu" in names and "keras" in names, extra
    # A developer's venv gets one build: never tensorflow and tensorflow-cpu together.
    for extra in project["optional-dependencies"]:  # type: ignore[index,union-attr]
        assert not {"tensorflow", "tensorflow-cpu"} <= _all_names(project, [extra]), extra


def test_the_serve_extra_brings_onnx_runtime_and_no_tensorflow() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    serve = _all_names(project, ["serve"])
    assert {"onnxruntime", "celery", "scikit-image", "opencv-python-headless", "prometheus-client"} <= serve
    assert not serve & {"tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "matplotlib"}


def test_every_image_installs_with_the_constraints() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert len(installs) == 5
    assert all("--constraint /wheels/constraints.txt" in line for line in installs), installs
    assert "constraints.txt" in next(line for line in dockerfile.splitlines() if line.startswith("COPY pyproject"))
