"""The peer versions are pinned once (`dpo_kernels/bench/peers.py`) and every place that names them agrees: the
providers' descriptions and install hints, the report's stamp, the `trl` extra of pyproject.toml. The Makefile's
wheel list and gpu_check.sh's map are checked in tests/tooling/test_gpu_check.py."""
import re
import subprocess
import sys

import pytest
import torch

from dpo_kernels.bench import peers, report
from dpo_kernels.bench.providers import OPS
from tests.helpers import REPO_ROOT


def test_each_peer_is_a_provider_of_every_op_named_by_its_pinned_version():
    for op, providers in OPS.items():
        by_name = {p.name: p for p in providers}
        for peer in peers.PEERS:
            provider = by_name[peer.provider]
            assert provider.description.startswith(peer.title), (op, provider.description)
            if provider.install_hint:
                assert provider.install_hint == peer.install_hint, (op, provider.name)
                assert provider.install_hint.startswith(f"needs {peer.package} >= {peer.version};" if peer.since
                                                        else f"pip install {peer.package}=={peer.version}")
            assert not re.search(r"\d+\.\d+", provider.description.removeprefix(peer.title)), provider.description


def test_the_stamp_lists_every_peer_package_once():
    versions = report.stamp(torch.device("cpu"))["versions"]
    packages = list(dict.fromkeys(p.package for p in peers.PEERS if p.package != "torch"))
    assert list(versions) == ["torch", "triton", "transformers", *packages, "dpo_kernels"]
    assert {p.package for p in peers.PEERS} <= set(versions)


def test_the_trl_extra_admits_the_pinned_trl():
    specifiers = pytest.importorskip("packaging.specifiers")
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    trl = peers.BY_PROVIDER["trl"]
    spec = next(s for s in extras["trl"] if peers.normalize(re.split(r"[<>=!~ ]", s, maxsplit=1)[0]) == "trl")
    assert specifiers.SpecifierSet(spec.removeprefix("trl")).contains(trl.version), (spec, trl.version)


def test_every_wheel_is_pinned_once_and_mapped_to_its_peers_rows():
    pins = peers.wheels()
    names = [peers.normalize(pin.split("==")[0]) for pin in pins]
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", pin) for pin in pins), pins
    assert len(set(names)) == len(names), names
    for peer in peers.PEERS:
        assert (peers.normalize(peer.package) in names) == peer.wheel, peer.provider
        if not peer.wheel:
            continue
        for pin in (peer.pin, *peer.needs):
            wheel = f"{pin.split('==')[0].replace('-', '_')}-{pin.split('==')[1]}-py3-none-any.whl"
            assert peers.needed_by(wheel).startswith(peer.short) and peers.needed_by(wheel).endswith(peer.rows)
    assert peers.needed_by("unrelated-1.0-py3-none-any.whl") == "whatever imports unrelated"


def test_a_since_peer_names_the_first_release_and_the_installed_one():
    native = peers.BY_PROVIDER["torch_native"]
    assert native.pin == "torch>=2.13.0" and native.title == "PyTorch >= 2.13.0"
    assert native.install_hint == f"needs torch >= 2.13.0; this is torch {peers._installed('torch')}"
    assert peers._installed("no-such-distribution-xyz") == "(not installed)"


def test_the_file_runs_without_any_installed_package():
    """`make gpu-wheels` and gpu_check.sh run it as a file, where dpo_kernels may be unbuilt: -I -S leaves the
    standard library only."""
    run = [sys.executable, "-I", "-S", str(REPO_ROOT / "dpo_kernels" / "bench" / "peers.py")]
    out = subprocess.run([*run, "--wheels"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.split() == peers.wheels()
    out = subprocess.run([*run, "--packages"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.split() == [pin.split("==")[0] for pin in peers.wheels()]
    out = subprocess.run([*run, "--needed-by", "liger_kernel-0.8.5-py3-none-any.whl"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert out.strip() == peers.needed_by("liger-kernel")


def test_the_readme_peer_table_shows_the_pinned_package_and_version():
    readme = (REPO_ROOT / "README.md").read_text()
    rows = {m.group(1): m.group(2, 3) for m in re.finditer(r"^\| `(\w+)` \| `([\w.-]+)` \| ([^|]+?) \|", readme,
                                                             re.MULTILINE)}
    for peer in peers.PEERS:
        assert rows.get(peer.provider) == (peer.package, f"≥ {peer.version}" if peer.since else peer.version), (
            peer.provider, rows.get(peer.provider))
